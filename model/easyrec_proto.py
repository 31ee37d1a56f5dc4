"""The part of EasyRec's pipeline config (`easy_rec/python/protos/*.proto`) this project reads.

The messages below are EasyRec's, cut down to the fields `model/easyrec.py` translates (or that
change nothing about the trained model, such as checkpoint intervals), with EasyRec's defaults.
Parsing a pipeline.config against them with protobuf's own `text_format` means every field that
is left out here is refused by the parser, with its line and column: nothing is ignored unseen.
Field numbers are not EasyRec's; text format does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

PACKAGE = "easyrec"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "bool": _F.TYPE_BOOL,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32,
    # EasyRec declares its rates `float`; read as double, 0.001 stays 0.001 in the YAML.
    "double": _F.TYPE_DOUBLE,
}


@dataclass(frozen=True)
class _Field:
    name: str
    type: str  # a scalar above, or a message or enum of this file
    repeated: bool = False
    default: str | None = None  # text form, as in a .proto `[default = ...]`
    oneof: str | None = None


def _opt(name: str, type_: str, default: str | None = None, oneof: str | None = None) -> _Field:
    return _Field(name, type_, default=default, oneof=oneof)


def _rep(name: str, type_: str) -> _Field:
    return _Field(name, type_, repeated=True)


ENUMS: dict[str, list[tuple[str, int]]] = {
    "FeatureType": [("IdFeature", 0), ("RawFeature", 1), ("TagFeature", 2)],
    "FieldType": [
        ("INT32", 0),
        ("INT64", 1),
        ("STRING", 2),
        ("FLOAT", 4),
        ("DOUBLE", 5),
        ("BOOL", 6),
    ],
    # Every input type is read: the rows come from `mmoe train --data` whatever the type says.
    "InputType": [
        ("CSVInput", 10),
        ("CSVInputV2", 11),
        ("CSVInputEx", 12),
        ("OdpsInput", 2),
        ("OdpsInputV2", 3),
        ("OdpsInputV3", 9),
        ("DataHubInput", 15),
        ("RTPInput", 4),
        ("RTPInputV2", 5),
        ("OdpsRTPInput", 601),
        ("OdpsRTPInputV2", 602),
        ("TFRecordInput", 7),
        ("BatchTFRecordInput", 14),
        ("DummyInput", 8),
        ("KafkaInput", 13),
        ("HiveInput", 16),
        ("HiveRTPInput", 17),
        ("HiveParquetInput", 18),
        ("ParquetInput", 19),
        ("ParquetInputV2", 20),
        ("ParquetInputV3", 21),
        ("CriteoInput", 1001),
    ],
    "WideOrDeep": [("DEEP", 0)],
    "LossType": [("CLASSIFICATION", 0), ("L2_LOSS", 1), ("PAIR_WISE_LOSS", 8)],
    "DistributionStrategy": [
        ("NoStrategy", 0),
        ("PSStrategy", 1),
        ("MirroredStrategy", 2),
        ("CollectiveAllReduceStrategy", 3),
        ("ExascaleStrategy", 4),
        ("MultiWorkerMirroredStrategy", 5),
        ("HorovodStrategy", 6),
        ("SokStrategy", 7),
        ("EmbeddingParallelStrategy", 8),
    ],
}

# Where EasyRec reads rows, and what it does after training: `mmoe train --data/--valid/--out`
# and `mmoe export` say it here, so these are accepted and not read.
DATA_SOURCE_FIELDS = (
    "train_input_path",
    "eval_input_path",
    "kafka_train_input",
    "kafka_eval_input",
    "datahub_train_input",
    "datahub_eval_input",
    "hive_train_input",
    "hive_eval_input",
)

MESSAGES: dict[str, list[_Field]] = {
    "EasyRecConfig": [
        # Data sources and paths: `mmoe train` takes --data, --valid and --out instead.
        _opt("train_input_path", "string"),
        _opt("eval_input_path", "string"),
        _opt("kafka_train_input", "KafkaServer"),
        _opt("kafka_eval_input", "KafkaServer"),
        _opt("datahub_train_input", "DatahubServer"),
        _opt("datahub_eval_input", "DatahubServer"),
        _opt("hive_train_input", "HiveConfig"),
        _opt("hive_eval_input", "HiveConfig"),
        _opt("model_dir", "string"),
        _opt("export_config", "ExportConfig"),
        _opt("train_config", "TrainConfig"),
        _opt("eval_config", "EvalConfig"),
        _opt("data_config", "DatasetConfig"),
        _rep("feature_configs", "FeatureConfig"),
        _opt("feature_config", "FeatureConfigV2"),
        _opt("model_config", "EasyRecModel"),
    ],
    "TrainConfig": [
        _rep("optimizer_config", "Optimizer"),
        _opt("num_steps", "uint32", "0"),
        # TensorFlow run settings: no effect on the trained model.
        _opt("sync_replicas", "bool", "true"),
        _opt("save_checkpoints_steps", "uint32", "1000"),
        _opt("save_checkpoints_secs", "uint32"),
        _opt("keep_checkpoint_max", "uint32", "10"),
        _opt("save_summary_steps", "uint32", "1000"),
        _opt("log_step_count_steps", "uint32", "10"),
        _opt("is_profiling", "bool", "false"),
        _opt("summary_model_vars", "bool", "false"),
        _opt("startup_delay_steps", "double", "15"),
        _opt("sparse_accumulator_type", "string"),
        _opt("inter_op_parallelism_threads", "int32", "0"),
        _opt("intra_op_parallelism_threads", "int32", "0"),
        _opt("tensor_fuse", "bool", "false"),
        _opt("write_graph", "bool", "true"),
        _opt("protocol", "string"),
        # TensorFlow's distribution: here one process, or DDP over `mmoe train --nproc N`.
        _opt("train_distribute", "DistributionStrategy", "NoStrategy"),
        _opt("num_gpus_per_worker", "int32", "1"),
    ],
    "KafkaServer": [
        _opt("server", "string"),
        _opt("topic", "string"),
        _opt("group", "string"),
        _opt("partitions", "uint32"),
        _rep("offset", "uint32"),
        _opt("offset_time", "string"),
    ],
    "DatahubServer": [
        _opt("akId", "string"),
        _opt("akSecret", "string"),
        _opt("region", "string"),
        _opt("project", "string"),
        _opt("topic", "string"),
        _opt("shard_num", "uint32"),
        _opt("life_cycle", "uint32"),
    ],
    "HiveConfig": [
        _opt("host", "string"),
        _opt("port", "uint32", "10000"),
        _opt("username", "string"),
        _opt("password", "string"),
        _opt("database", "string", "default"),
        _opt("table_name", "string"),
        _opt("hash_fields", "string"),
        _opt("limit_num", "uint32", "0"),
        _opt("fetch_size", "uint32", "512"),
    ],
    "ExportConfig": [
        _opt("batch_size", "int32", "-1"),
        _opt("exporter_type", "string", "final"),
        _opt("best_exporter_metric", "string", "auc"),
        _opt("metric_bigger", "bool", "true"),
        _opt("enable_early_stop", "bool", "false"),
        _opt("max_check_steps", "int32", "10000"),
        _opt("multi_placeholder", "bool", "true"),
        _opt("exports_to_keep", "int32", "1"),
        _opt("placeholder_named_by_input", "bool", "false"),
        _opt("filter_inputs", "bool", "true"),
    ],
    "Optimizer": [
        _opt("adam_optimizer", "AdamOptimizer", oneof="optimizer"),
        _opt("use_moving_average", "bool", "false"),
    ],
    "AdamOptimizer": [_opt("learning_rate", "LearningRate")],
    "LearningRate": [
        _opt("constant_learning_rate", "ConstantLearningRate", oneof="learning_rate"),
        _opt(
            "exponential_decay_learning_rate", "ExponentialDecayLearningRate", oneof="learning_rate"
        ),
    ],
    "ConstantLearningRate": [_opt("learning_rate", "double", "0.002")],
    "ExponentialDecayLearningRate": [
        _opt("initial_learning_rate", "double", "0.002"),
        _opt("decay_steps", "uint32", "4000000"),
        _opt("decay_factor", "double", "0.95"),
        _opt("staircase", "bool", "true"),
        _opt("min_learning_rate", "double", "0.0"),
    ],
    "EvalConfig": [_rep("metrics_set", "EvalMetrics")],
    "EvalMetrics": [
        _opt("auc", "AUC", oneof="metric"),
        _opt("mean_absolute_error", "MeanAbsoluteError", oneof="metric"),
        _opt("mean_squared_error", "MeanSquaredError", oneof="metric"),
        _opt("accuracy", "Accuracy", oneof="metric"),
    ],
    # AUC is exact here; num_thresholds (TensorFlow's approximation) changes no model.
    "AUC": [_opt("num_thresholds", "uint32", "200")],
    "MeanAbsoluteError": [],
    "MeanSquaredError": [],
    "Accuracy": [],
    "DatasetConfig": [
        _opt("batch_size", "uint32", "32"),
        _rep("input_fields", "Field"),
        _rep("label_fields", "string"),
        _opt("shuffle", "bool", "true"),
        _opt("num_epochs", "uint32", "0"),
        _opt("input_type", "InputType"),
        _opt("separator", "string", ","),
        _opt("with_header", "bool", "false"),
        # Input pipeline settings: no effect on the trained model.
        _opt("shuffle_buffer_size", "int32", "32"),
        _opt("prefetch_size", "uint32", "32"),
        _opt("num_parallel_calls", "uint32", "8"),
        _opt("selected_cols", "string"),
        _opt("selected_col_types", "string"),
        _opt("pai_worker_queue", "bool", "false"),
        _opt("pai_worker_slice_num", "int32", "100"),
        _opt("chief_redundant", "bool", "false"),
        _opt("shard", "bool", "false"),
        _opt("file_shard", "bool", "false"),
        _opt("eval_batch_size", "uint32", "4096"),
        _opt("drop_remainder", "bool", "false"),
    ],
    "Field": [
        _opt("input_name", "string"),
        _opt("input_type", "FieldType", "STRING"),
        _opt("default_val", "string"),
    ],
    "FeatureConfigV2": [_rep("features", "FeatureConfig")],
    "FeatureConfig": [
        _opt("feature_name", "string"),
        _rep("input_names", "string"),
        _opt("feature_type", "FeatureType", "IdFeature"),
        _opt("embedding_name", "string", ""),
        _opt("embedding_dim", "uint32", "0"),
        _opt("hash_bucket_size", "uint64", "0"),
        _opt("num_buckets", "uint64", "0"),
        _rep("boundaries", "double"),
        _opt("separator", "string", "|"),
        _rep("vocab_list", "string"),
        _opt("combiner", "string", "mean"),
    ],
    "EasyRecModel": [
        _opt("model_class", "string"),
        _opt("model_name", "string"),
        _rep("feature_groups", "FeatureGroupConfig"),
        _opt("model_params", "ModelParams", oneof="model"),
        _opt("mmoe", "MMoE", oneof="model"),
        _opt("esmm", "ESMM", oneof="model"),
        _opt("ple", "PLE", oneof="model"),
        _opt("embedding_regularization", "double", "0.0"),
        _opt("backbone", "BackboneTower"),
    ],
    "FeatureGroupConfig": [
        _opt("group_name", "string"),
        _rep("feature_names", "string"),
        _opt("wide_deep", "WideOrDeep", "DEEP"),
    ],
    "ModelParams": [
        _opt("l2_regularization", "double", "0.0"),
        _rep("task_towers", "TaskTower"),  # EasyRec's BayesTaskTower, its common fields
    ],
    "MMoE": [
        # deprecated in EasyRec, still in its samples: one DNN per expert
        _rep("experts", "ExpertTower"),
        _opt("expert_dnn", "DNN"),
        _opt("num_expert", "uint32", "0"),
        _rep("task_towers", "TaskTower"),
        _opt("l2_regularization", "double", "1e-4"),
    ],
    "ExpertTower": [_opt("expert_name", "string"), _opt("dnn", "DNN")],
    "ESMM": [
        _rep("groups", "Tower"),
        _opt("ctr_tower", "TaskTower"),
        _opt("cvr_tower", "TaskTower"),
        _opt("l2_regularization", "double", "1e-4"),
    ],
    "Tower": [_opt("input", "string"), _opt("dnn", "DNN")],
    "PLE": [
        _rep("extraction_networks", "ExtractionNetwork"),
        _rep("task_towers", "TaskTower"),
        _opt("l2_regularization", "double", "1e-4"),
    ],
    "ExtractionNetwork": [
        _opt("network_name", "string"),
        _opt("expert_num_per_task", "uint32"),
        _opt("share_num", "uint32"),
        _opt("task_expert_net", "DNN"),
        _opt("share_expert_net", "DNN"),
    ],
    "TaskTower": [
        _opt("tower_name", "string"),
        _opt("label_name", "string"),
        _rep("metrics_set", "EvalMetrics"),
        _opt("loss_type", "LossType", "CLASSIFICATION"),
        _opt("num_class", "uint32", "1"),
        _opt("dnn", "DNN"),
        _opt("weight", "double", "1.0"),
        _rep("losses", "Loss"),
    ],
    "Loss": [
        _opt("loss_type", "LossType"),
        _opt("weight", "double", "1.0"),
        _opt("pairwise_loss", "PairwiseLoss", oneof="loss_param"),
    ],
    "PairwiseLoss": [_opt("margin", "double", "0")],
    "DNN": [
        _rep("hidden_units", "uint32"),
        _rep("dropout_ratio", "double"),
        _opt("activation", "string", "tf.nn.relu"),
        _opt("use_bn", "bool", "true"),
    ],
    "MLP": [
        _rep("hidden_units", "uint32"),
        _rep("dropout_ratio", "double"),
        _opt("activation", "string", "relu"),
        _opt("use_bn", "bool", "true"),
    ],
    "BackboneTower": [_rep("blocks", "Block"), _rep("concat_blocks", "string")],
    "Block": [
        _opt("name", "string"),
        _rep("inputs", "Input"),
        _opt("input_layer", "InputLayer", oneof="layer"),
        _opt("keras_layer", "KerasLayer", oneof="layer"),
    ],
    "Input": [
        _opt("feature_group_name", "string", oneof="name"),
        _opt("block_name", "string", oneof="name"),
    ],
    "InputLayer": [_opt("only_output_feature_list", "bool")],
    "KerasLayer": [
        _opt("class_name", "string"),
        _opt("senet", "SENet", oneof="params"),
        _opt("mmoe", "MMoELayer", oneof="params"),
    ],
    "SENet": [_opt("reduction_ratio", "uint32", "4")],
    "MMoELayer": [
        _opt("num_task", "uint32"),
        _opt("expert_mlp", "MLP"),
        _opt("num_expert", "uint32"),
    ],
}


def _file_proto() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="mmoe_easyrec_subset.proto", package=PACKAGE, syntax="proto2"
    )
    for name, values in ENUMS.items():
        enum = file.enum_type.add(name=name)
        for value, number in values:
            enum.value.add(name=value, number=number)
    for name, fields in MESSAGES.items():
        message = file.message_type.add(name=name)
        oneofs: list[str] = []
        for number, f in enumerate(fields, start=1):
            field = message.field.add(name=f.name, number=number)
            field.label = _F.LABEL_REPEATED if f.repeated else _F.LABEL_OPTIONAL
            if f.type in _SCALARS:
                field.type = _SCALARS[f.type]
            else:
                field.type = _F.TYPE_ENUM if f.type in ENUMS else _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{f.type}"
            if f.default is not None:
                field.default_value = f.default
            if f.oneof is not None:
                if f.oneof not in oneofs:
                    oneofs.append(f.oneof)
                    message.oneof_decl.add(name=f.oneof)
                field.oneof_index = oneofs.index(f.oneof)
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_proto())


def message_class(name: str) -> Any:
    """The generated class of one of the messages above, e.g. `message_class("EasyRecConfig")`."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def new_pipeline_config() -> Message:
    """An empty EasyRecConfig, to parse a pipeline.config into."""
    message: Message = message_class("EasyRecConfig")()
    return message


def supported_fields(message: str) -> list[str]:
    """The field names this project reads in an EasyRec message (for error messages)."""
    return [f.name for f in MESSAGES.get(message, [])]
