"""EasyRec pipeline configs (protobuf text format) -> this project's YAML config.

`mmoe train --config pipeline.config` and `mmoe convert-config` read a pipeline.config with
protobuf's `text_format` against the subset of EasyRec's messages in `model/easyrec_proto.py`,
and translate it into the YAML form (`model/config.py`, the one internal form). The models read:
the built-in `model_class: "MMoE"` (`mmoe { expert_dnn, num_expert, task_towers }`, or the
deprecated `experts { }`, optionally behind a backbone of input_layer -> SENet), the component
form `model_class: "MultiTaskModel"` (backbone blocks input_layer -> [SENet] -> MMoE,
`model_params.task_towers`), `ESMM` and `PLE`. A model that needs what no network here has
(DBMTL's task relations, AITM's transfer between towers, towers that share nothing) is refused
in one line naming it, before the fields are parsed (`missing_part`). A field this project does
not read fails with its line; a value it cannot honour (a second feature group outside ESMM,
per-layer dropout ratios, ...) fails with the field's path and line. Where EasyRec reads its rows
(paths, Hive/Kafka/DataHub blocks, input types) is a note: the rows come from `--data`. What the
translation had to decide is returned as notes. docs/easyrec.md has the whole mapping.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from mmoe.model.config import MAX_NUM_BUCKETS, ConfigError, RunConfig, parse_config
from mmoe.model.easyrec_proto import (
    DATA_SOURCE_FIELDS,
    ENUMS,
    new_pipeline_config,
    supported_fields,
)
from mmoe.model.overrides import apply_overrides

EXTENSIONS = (".config", ".prototxt", ".pbtxt")
# A pipeline.config starts its sections as `name {` (or `name: {`); YAML never does.
_SECTION = re.compile(
    r"^\s*(model_config|data_config|train_config|eval_config|feature_configs?)\s*:?\s*[{<]", re.M
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# EasyRec names activations as TensorFlow functions. Not leaky_relu: TensorFlow's slope is 0.2,
# PyTorch's 0.01.
ACTIVATIONS = {
    **{name: name for name in ("relu", "gelu", "tanh", "sigmoid")},
    **{f"tf.nn.{name}": name for name in ("relu", "gelu", "tanh", "sigmoid")},
    "tf.tanh": "tanh",
    "tf.sigmoid": "sigmoid",
    "swish": "silu",
    "tf.nn.swish": "silu",
    "silu": "silu",
    "tf.nn.silu": "silu",
}
_METRICS = {
    "auc": "auc",
    "mean_absolute_error": "mae",
    "mean_squared_error": "mse",
    "accuracy": "accuracy",
}
_APPLIES = {
    "binary": ("auc", "accuracy"),
    "regression": ("mse", "mae"),
    "multiclass": ("accuracy",),
}
_DEFAULT_METRIC = {"binary": "auc", "regression": "mse", "multiclass": "accuracy"}
TAG_MAX_LEN = 20


class EasyRecConfigError(ConfigError):
    """A pipeline.config this project cannot train; the message names the field and its line."""


def is_easyrec_config(path: str | Path) -> bool:
    """By extension (.config, .prototxt, .pbtxt), else by content: YAML files are not."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in EXTENSIONS:
        return True
    if suffix in (".yaml", ".yml"):
        return False
    try:
        return _SECTION.search(p.read_text(errors="replace")) is not None
    except OSError:
        return False


# ------------------------------------------------------------------------- where fields are

Key = tuple[tuple[str, int], ...]


def field_lines(text: str) -> dict[Key, int]:
    """The line of every field of a (valid) pipeline.config, by its path: repeated fields by
    index, e.g. ((model_config, 0), (mmoe, 0), (task_towers, 1)). Walks the tokens with
    protobuf's own text-format tokenizer; values are not interpreted."""
    tok = text_format.Tokenizer(text.splitlines())
    lines: dict[Key, int] = {}

    def line() -> int:
        return int(tok.ParseError("").GetLine())

    def value(key: Key) -> None:
        for opening, closing in (("{", "}"), ("<", ">")):
            if tok.TryConsume(opening):
                message(key, closing)
                tok.Consume(closing)
                return
        tok.NextToken()
        while tok.token[:1] in ("'", '"'):  # adjacent strings are one value
            tok.NextToken()

    def message(prefix: Key, closing: str | None) -> None:
        counts: dict[str, int] = {}
        while not tok.AtEnd() and not (closing and tok.LookingAt(closing)):
            if tok.TryConsume(",") or tok.TryConsume(";"):
                continue
            at = line()
            name = tok.ConsumeIdentifier()
            index = counts.get(name, 0)
            tok.TryConsume(":")
            if tok.TryConsume("["):
                while not tok.TryConsume("]"):
                    if tok.TryConsume(","):
                        continue
                    lines.setdefault((*prefix, (name, index)), at)
                    value((*prefix, (name, index)))
                    index += 1
                lines.setdefault((*prefix, (name, counts.get(name, 0))), at)
                counts[name] = index
            else:
                lines.setdefault((*prefix, (name, index)), at)
                value((*prefix, (name, index)))
                counts[name] = index + 1

    # Only text the parser refused fails here; the lines found so far still help.
    with contextlib.suppress(text_format.ParseError):
        message((), None)
    return lines


@dataclass(frozen=True)
class _At:
    """A field's path in the pipeline config (for errors): `model_config.mmoe.task_towers[1]`."""

    key: Key = ()
    repeated: tuple[bool, ...] = ()

    def __call__(self, name: str) -> _At:
        return _At((*self.key, (name, 0)), (*self.repeated, False))

    def item(self, name: str, index: int) -> _At:
        return _At((*self.key, (name, index)), (*self.repeated, True))

    @property
    def text(self) -> str:
        parts = [
            f"{name}[{i}]" if rep else name
            for (name, i), rep in zip(self.key, self.repeated, strict=True)
        ]
        return ".".join(parts) or "<root>"


# ------------------------------------------------------------------------------ translation


@dataclass
class Translation:
    """A pipeline.config in YAML form, and what the translation decided on the user's behalf."""

    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    source: str = "pipeline.config"


def parse_pipeline(text: str, source: str = "pipeline.config") -> Message:
    """The EasyRecConfig message; raises EasyRecConfigError naming an unsupported field's line."""
    message = new_pipeline_config()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise EasyRecConfigError(_explain(err, source)) from None
    return message


def _explain(err: text_format.ParseError, source: str) -> str:
    where = f"{source}:{err.GetLine()}:{err.GetColumn()}"
    msg = str(err)
    match = re.search(r'Message type "[\w.]*?(\w+)" has no field named "(\w+)"', msg)
    if match:
        message, name = match.groups()
        known = supported_fields(message)
        reads = f"reads only {', '.join(known)}" if known else "reads no fields in it"
        return f"{where}: {name} (in {message}) is not supported: this project {reads}"
    match = re.search(r'Enum type "[\w.]*?(\w+)" has no value named (\w+)', msg)
    if match:
        enum, value = match.groups()
        values = ", ".join(v for v, _ in ENUMS.get(enum, []))
        return f"{where}: {value} (a {enum}) is not supported: this project takes {values}"
    body = re.sub(r"^\d+:\d+ : ", "", msg)
    return f"{where}: {body}"


# ------------------------------------------------------------- models this project lacks

MODEL_CLASSES = ("MMoE", "MultiTaskModel", "ESMM", "PLE")
_TRAINS = "MMoE, ESMM and PLE configs train here (docs/easyrec.md)"
_MODEL_CLASS = re.compile(r"\bmodel_class\s*:\s*(['\"])(\w+)\1")
_KERAS_CLASS = re.compile(r"\bclass_name\s*:\s*(['\"])(\w+)\1")
_RELATIONS = re.compile(r"\brelation_tower_names\s*:")
# What a model needs that no network here has: the one thing missing, by model.
_RELATION_REASON = (
    "DBMTL needs task relations (a tower that reads other towers' outputs: "
    "relation_tower_names, relation_dnn), which no network here has"
)
_SHARE_NOTHING_REASON = (
    "its towers read the features with nothing shared between the tasks (SimpleMultiTask), "
    "and every network here shares experts or a bottom between its tasks"
)
_MISSING_CLASS = {"DBMTL": _RELATION_REASON, "SimpleMultiTask": _SHARE_NOTHING_REASON}
_MISSING_LAYER = {
    "AITMTower": "AITM needs information passed from one task's tower into the next "
    "(AITMTower's attention between towers), which no network here has",
}


def missing_part(text: str, source: str = "pipeline.config") -> str | None:
    """The one-line reason a pipeline.config's model cannot train here, naming the one thing it
    needs that no network of this project has, or None. Read from the text before parsing, so
    that a DBMTL or AITM config is refused for what it is rather than for its first field."""

    def at(pos: int) -> str:
        return f"{source}:{text.count(chr(10), 0, pos) + 1}"

    found = _MODEL_CLASS.search(text)
    if found is None:
        return None
    model_class = found.group(2)
    where = f"{at(found.start())}: model_config.model_class: {model_class!r}"
    if model_class not in MODEL_CLASSES:
        reason = _MISSING_CLASS.get(model_class, "not a model class this project has")
        return f"{where} is not trained here: {reason}; {_TRAINS}"
    if model_class != "MultiTaskModel":
        return None
    relations = _RELATIONS.search(text)
    if relations is not None:
        return f"{at(relations.start())}: relation_tower_names: {_RELATION_REASON}; {_TRAINS}"
    layers = list(_KERAS_CLASS.finditer(text))
    for layer in layers:
        if layer.group(2) in _MISSING_LAYER:
            return f"{at(layer.start())}: keras_layer {layer.group(2)!r}: " + (
                f"{_MISSING_LAYER[layer.group(2)]}; {_TRAINS}"
            )
    for layer in layers:
        if layer.group(2) not in ("SENet", "MMoE"):
            return (
                f"{at(layer.start())}: keras_layer {layer.group(2)!r} is not a layer here: "
                f"backbones are input_layer -> [SENet] -> MMoE; {_TRAINS}"
            )
    if not any(layer.group(2) == "MMoE" for layer in layers):
        return f"{where}: the backbone has no MMoE block: {_SHARE_NOTHING_REASON}; {_TRAINS}"
    return None


def translate(text: str, source: str = "pipeline.config") -> Translation:
    """A pipeline.config's text -> its Translation (raises EasyRecConfigError)."""
    reason = missing_part(text, source)
    if reason is not None:
        raise EasyRecConfigError(reason)
    message = parse_pipeline(text, source)
    return _Translator(message, field_lines(text), source).run()


def translate_file(path: str | Path) -> Translation:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    return translate(text, str(path))


def load_pipeline_config(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[RunConfig, dict[str, Any], list[str]]:
    """Translate, apply `key=value` overrides to the YAML form and validate: (config, its YAML
    form, notes)."""
    translation = translate_file(path)
    mapping = apply_overrides(translation.config, overrides)
    return _validated(mapping, path), mapping, list(translation.notes)


def _validated(mapping: dict[str, Any], path: str | Path) -> RunConfig:
    try:
        return parse_config(mapping)
    except ConfigError as err:
        raise ConfigError(f"{path} (in its YAML form): {err}") from None


@dataclass
class _Network:
    """The model section of a pipeline.config in YAML form: `model` keys, the towers (each with
    its path), the l2 regularisation, and the settings towers must share with the experts."""

    model: dict[str, Any]
    towers: list[tuple[Any, _At]]
    l2: float
    layer: dict[str, Any]  # activation, dropout, batch_norm
    # tower index -> (the tower it multiplies, the product's name): ESMM
    products: dict[int, tuple[int, str]] = field(default_factory=dict)


class _Translator:
    def __init__(self, message: Any, lines: dict[Key, int], source: str) -> None:
        self.m = message
        self.lines = lines
        self.source = source
        self.notes: list[str] = []
        self.raw_ignored: list[str] = []  # "feature (option, ...)" for each RawFeature

    def fail(self, at: _At, reason: str) -> EasyRecConfigError:
        key = at.key
        while key and key not in self.lines:
            key = key[:-1]  # an unset field: the line of the message that lacks it
        where = f"{self.source}:{self.lines[key]}" if key else self.source
        return EasyRecConfigError(f"{where}: {at.text}: {reason}")

    def line(self, at: _At) -> int | None:
        return self.lines.get(at.key)

    # ------------------------------------------------------------------------------ run

    def run(self) -> Translation:
        m = self.m
        root = _At()
        if not m.HasField("model_config"):
            raise self.fail(root("model_config"), "required")
        mc, mc_at = m.model_config, root("model_config")
        builders = {
            "MMoE": self._mmoe,
            "MultiTaskModel": self._multi_task_model,
            "ESMM": self._esmm,
            "PLE": self._ple,
        }
        if mc.model_class not in builders:
            raise self.fail(
                mc_at("model_class"),
                f"{mc.model_class!r}: this project trains {', '.join(MODEL_CLASSES)}",
            )
        columns, defaults, data_section = self._data(root("data_config"))
        groups = self._groups(mc, mc_at, several=mc.model_class == "ESMM")
        configured = self._feature_configs(root, groups)
        features = [
            self._feature(*configured[name], columns, defaults, group)
            for group, names in groups
            for name in names
        ]
        self._note_ignored_raw_options()
        net = builders[mc.model_class](mc, mc_at, groups)
        batch_size = data_section.pop("batch_size")
        tasks = self._towers(net.towers, net.layer, columns)
        for i, (other, product) in net.products.items():
            tasks[i] |= {"multiply": tasks[other]["name"], "product": product}
        model: dict[str, Any] = {
            **net.model,
            "gate_units": [],
            **net.layer,
            # TensorFlow's l2 regulariser is scale * sum(w^2) / 2; here l2 * sum(w^2).
            "l2": net.l2 / 2,
            # EasyRec: scale * sum(e^2) / 2 over the batch's embedded features; here
            # embedding_l2 * sum(e^2) / batch_size.
            "embedding_l2": mc.embedding_regularization * batch_size / 2,
        }
        if net.l2 or mc.embedding_regularization:
            self.notes.append(
                f"l2_regularization {net.l2:g} and embedding_regularization "
                f"{mc.embedding_regularization:g} are EasyRec's TensorFlow penalties (half the "
                f"sum of squares; embeddings summed over the batch): model.l2 "
                f"{model['l2']:g} and model.embedding_l2 {model['embedding_l2']:g} here (for "
                f"batches of {batch_size})"
            )
        train = {"batch_size": batch_size, **data_section, **self._optimizer(root)}
        tc, dc = m.train_config, m.data_config
        if tc.num_steps:  # EasyRec stops at num_steps, or num_epochs if that comes first
            train["num_steps"] = tc.num_steps
            train["epochs"] = min(dc.num_epochs or tc.num_steps, tc.num_steps)
        elif dc.num_epochs:
            train["epochs"] = dc.num_epochs
        config: dict[str, Any] = {
            "name": mc.model_name or Path(self.source).stem,
            "version": "1",
            "features": features,
            "tasks": tasks,
            "model": model,
            "train": train,
        }
        if columns is not None or m.HasField("data_config"):
            config["data"] = {"separator": m.data_config.separator}
            if columns is not None:
                config["data"]["columns"] = columns
        tags = [f["name"] for f in features if f["kind"] == "tags"]
        if tags:
            self.notes.append(
                f"tag features keep their first {TAG_MAX_LEN} ids ({', '.join(tags)}); "
                "raise features[i].max_len to keep more"
            )
        self._note_sources(root, columns is not None)
        if tc.train_distribute != _enum("DistributionStrategy", "NoStrategy"):
            strategy = dict((v, k) for k, v in ENUMS["DistributionStrategy"])[tc.train_distribute]
            self.notes.append(
                f"train_config.train_distribute {strategy} (num_gpus_per_worker "
                f"{tc.num_gpus_per_worker}) is TensorFlow's: here one process trains, or "
                "`mmoe train --nproc N` trains the same batches over N processes (DDP)"
            )
        return Translation(config, self.notes, self.source)

    def _note_sources(self, root: _At, headerless: bool) -> None:
        """One note for everything that says where EasyRec reads its rows and writes its model."""
        m = self.m
        named = [f for f in DATA_SOURCE_FIELDS if m.HasField(f)]
        input_type = m.data_config.input_type
        if m.data_config.HasField("input_type") and input_type not in (
            _enum("InputType", "CSVInput"),
            _enum("InputType", "CSVInputEx"),
        ):
            names = dict((v, k) for k, v in ENUMS["InputType"])
            named.append(f"data_config.input_type {names[input_type]}")
        named += [f for f in ("model_dir", "export_config") if m.HasField(f)]
        if not named:
            return
        order = "in data_config.input_fields order" if headerless else "by the header's names"
        self.notes.append(
            f"{', '.join(named)}: not read; the rows come from --data (and --valid), CSV files "
            f"{order} or Parquet; the run goes to --out and `mmoe export` writes the model"
        )

    # ---------------------------------------------------------------------------- models

    def _mmoe(self, mc: Any, mc_at: _At, groups: list[tuple[str, list[str]]]) -> _Network:
        senet, _ = self._backbone(mc, mc_at, groups[0][0])
        if mc.WhichOneof("model") != "mmoe":
            raise self.fail(mc_at("mmoe"), "model_class MMoE needs mmoe { ... }")
        at, mm = mc_at("mmoe"), mc.mmoe
        if not mm.HasField("expert_dnn") and mm.experts:
            num_experts, expert = self._deprecated_experts(list(mm.experts), at)
        else:
            if mm.num_expert < 1:
                raise self.fail(at("num_expert"), "at least 1 expert")
            num_experts, expert = mm.num_expert, self._dnn(mm.expert_dnn, at("expert_dnn"))
            if not expert["units"]:
                raise self.fail(at("expert_dnn")("hidden_units"), "experts need a hidden layer")
        towers = [(t, at.item("task_towers", i)) for i, t in enumerate(mm.task_towers)]
        model = {"experts": num_experts, "expert_units": expert.pop("units")}
        self._senet(model, senet)
        return _Network(model, towers or self._required(at), mm.l2_regularization, expert)

    def _deprecated_experts(self, experts: list[Any], at: _At) -> tuple[int, dict[str, Any]]:
        """EasyRec's deprecated `experts { expert_name, dnn }`: K experts of one shape here."""
        shapes = []
        for i, e in enumerate(experts):
            dnn_at = at.item("experts", i)("dnn")
            if not e.HasField("dnn"):
                raise self.fail(dnn_at, "required")
            shapes.append(self._dnn(e.dnn, dnn_at))
            if not shapes[-1]["units"]:
                raise self.fail(dnn_at("hidden_units"), "experts need a hidden layer")
            if shapes[-1] != shapes[0]:
                raise self.fail(
                    dnn_at, "differs from experts[0]'s dnn: the experts here share one shape"
                )
        self.notes.append(
            f"mmoe.experts (EasyRec's deprecated form): {len(experts)} experts of hidden units "
            f"{shapes[0]['units']}, as num_expert {len(experts)} with that expert_dnn"
        )
        return len(experts), dict(shapes[0])

    def _multi_task_model(
        self, mc: Any, mc_at: _At, groups: list[tuple[str, list[str]]]
    ) -> _Network:
        senet, mmoe_layer = self._backbone(mc, mc_at, groups[0][0])
        if mc.WhichOneof("model") != "model_params":
            raise self.fail(mc_at("model_params"), "MultiTaskModel needs model_params")
        assert mmoe_layer is not None
        layer, layer_at = mmoe_layer
        if layer.num_expert < 1:
            raise self.fail(layer_at("num_expert"), "at least 1 expert")
        expert = self._dnn(layer.expert_mlp, layer_at("expert_mlp"))
        if not expert["units"]:
            raise self.fail(layer_at("expert_mlp")("hidden_units"), "experts need a hidden layer")
        at = mc_at("model_params")
        towers = [(t, at.item("task_towers", i)) for i, t in enumerate(mc.model_params.task_towers)]
        if layer.num_task != len(towers):
            raise self.fail(
                layer_at("num_task"),
                f"{layer.num_task} tasks, but model_params has {len(towers)} task_towers",
            )
        model = {"experts": layer.num_expert, "expert_units": expert.pop("units")}
        self._senet(model, senet)
        return _Network(
            model, towers or self._required(at), mc.model_params.l2_regularization, expert
        )

    def _esmm(self, mc: Any, mc_at: _At, groups: list[tuple[str, list[str]]]) -> _Network:
        """ESMM: a DNN per feature group, concatenated, then a ctr and a cvr tower; the cvr
        tower's label trains pCTR x pCVR (ctcvr) on every row. Here the group DNNs are one
        shared bottom (`experts: 1`) as wide as all of them, and `multiply` is ESMM's product."""
        if mc.WhichOneof("model") != "esmm":
            raise self.fail(mc_at("esmm"), "model_class ESMM needs esmm { ... }")
        if mc.HasField("backbone"):
            raise self.fail(mc_at("backbone"), "ESMM here has no backbone")
        at, es = mc_at("esmm"), mc.esmm
        known = [g for g, _ in groups]
        if not es.groups:
            raise self.fail(at("groups"), "required: a DNN per feature group")
        used: list[str] = []
        dnns = []
        for i, g in enumerate(es.groups):
            gat = at.item("groups", i)
            if g.input not in known or g.input in used:
                raise self.fail(
                    gat("input"), f"{g.input!r}: one of the feature groups {known}, once each"
                )
            used.append(g.input)
            dnns.append(self._dnn(g.dnn, gat("dnn")))
            if not dnns[-1]["units"] or len(dnns[-1]["units"]) != len(dnns[0]["units"]):
                raise self.fail(
                    gat("dnn")("hidden_units"),
                    "the groups' DNNs need the same number of layers here (they become one "
                    "bottom, layer by layer)",
                )
            for key in ("activation", "dropout", "batch_norm"):
                if dnns[-1][key] != dnns[0][key]:
                    raise self.fail(gat("dnn"), f"{key} differs from groups[0]'s: one here")
        units = [sum(layer) for layer in zip(*(d["units"] for d in dnns), strict=True)]
        shapes = ", ".join(f"{g} {d['units']}" for g, d in zip(used, dnns, strict=True))
        self.notes.append(
            f"esmm.groups: EasyRec's DNN per feature group ({shapes}), concatenated, is one "
            f"shared bottom here over all their features with the summed widths {units} "
            "(EasyRec's is this bottom with the weights between groups at zero)"
        )
        towers = []
        for name in ("ctr_tower", "cvr_tower"):
            if not es.HasField(name):
                raise self.fail(at(name), "required")
            towers.append((getattr(es, name), at(name)))
        model: dict[str, Any] = {"experts": 1, "expert_units": units}
        if used != known:
            model["groups"] = used
        layer = {k: dnns[0][k] for k in ("activation", "dropout", "batch_norm")}
        return _Network(model, towers, es.l2_regularization, layer, {1: (0, "ctcvr")})

    def _ple(self, mc: Any, mc_at: _At, groups: list[tuple[str, list[str]]]) -> _Network:
        if mc.WhichOneof("model") != "ple":
            raise self.fail(mc_at("ple"), "model_class PLE needs ple { ... }")
        if mc.HasField("backbone"):
            raise self.fail(mc_at("backbone"), "PLE here has no backbone")
        at, ple = mc_at("ple"), mc.ple
        nets = list(ple.extraction_networks)
        if not nets:
            raise self.fail(at("extraction_networks"), "required")
        units: list[list[int]] = []
        layer: dict[str, Any] = {}
        for i, n in enumerate(nets):
            nat = at.item("extraction_networks", i)
            for key in ("expert_num_per_task", "share_num"):
                if getattr(n, key) < 1:
                    raise self.fail(nat(key), "at least 1 (every layer has both kinds here)")
                if getattr(n, key) != getattr(nets[0], key):
                    raise self.fail(nat(key), f"the same {key} in every layer here")
            task = self._dnn(n.task_expert_net, nat("task_expert_net"))
            share = self._dnn(n.share_expert_net, nat("share_expert_net"))
            if not task["units"]:
                raise self.fail(nat("task_expert_net")("hidden_units"), "experts need a layer")
            if share != task:
                raise self.fail(
                    nat("share_expert_net"),
                    "differs from task_expert_net: one expert shape per layer here",
                )
            units.append(task.pop("units"))
            if layer and task != layer:
                raise self.fail(
                    nat("task_expert_net"),
                    "differs from layer 0's activation, "
                    "dropout or use_bn: one setting for every layer here",
                )
            layer = task
        model: dict[str, Any] = {
            "kind": "ple",
            "experts": nets[0].share_num,
            "task_experts": nets[0].expert_num_per_task,
            "ple_layers": len(nets),
            "expert_units": units[0],
        }
        if any(u != units[0] for u in units):
            model["ple_expert_units"] = units
        towers = [(t, at.item("task_towers", i)) for i, t in enumerate(ple.task_towers)]
        return _Network(model, towers or self._required(at), ple.l2_regularization, layer)

    def _required(self, at: _At) -> list[tuple[Any, _At]]:
        raise self.fail(at("task_towers"), "required")

    def _senet(self, model: dict[str, Any], senet: int | None) -> None:
        if senet is not None:
            model["senet"] = {"reduction_ratio": senet}
            self.notes.append(
                "SENet is FiBiNET's (one squeeze per feature, no skip connection or layer norm), "
                "not the grouped SENet of EasyRec's keras layer"
            )

    # ----------------------------------------------------------------------------- data

    def _data(self, at: _At) -> tuple[list[str] | None, dict[str, str], dict[str, Any]]:
        """(CSV column names or None when the files have a header, each column's default as
        text, train keys: batch_size, shuffle)."""
        dc = self.m.data_config
        defaults: dict[str, str] = {}
        names: list[str] = []
        for i, f in enumerate(dc.input_fields):
            fat = at.item("input_fields", i)
            if not f.input_name:
                raise self.fail(fat("input_name"), "required")
            if f.input_name in names:
                raise self.fail(fat("input_name"), f"{f.input_name!r} is named twice")
            names.append(f.input_name)
            if f.HasField("default_val"):
                defaults[f.input_name] = f.default_val
            else:  # CSVInput's record defaults: 0 for numbers, "" for strings
                defaults[f.input_name] = "" if f.input_type == _enum("FieldType", "STRING") else "0"
        if len(dc.separator) != 1:
            raise self.fail(at("separator"), "one-character separators only")
        columns = names if names and not dc.with_header else None
        return columns, defaults, {"batch_size": dc.batch_size, "shuffle": dc.shuffle}

    def _groups(self, mc: Any, at: _At, several: bool) -> list[tuple[str, list[str]]]:
        """(group name, its feature names) of each feature group: one feeds the model (EasyRec's
        MMoE, PLE: 'all'), or `several` (ESMM's user, item, ...), each feature in one group."""
        groups = mc.feature_groups
        if not groups or (len(groups) > 1 and not several):
            where = at.item("feature_groups", 1) if groups else at("feature_groups")
            raise self.fail(where, "one feature group feeds the model here (EasyRec's MMoE: 'all')")
        out: list[tuple[str, list[str]]] = []
        seen: set[str] = set()
        for gi, g in enumerate(groups):
            gat = at.item("feature_groups", gi)
            names = list(g.feature_names)
            if not names:
                raise self.fail(gat("feature_names"), "required")
            name = g.group_name or "all"
            if any(name == other for other, _ in out):
                raise self.fail(gat("group_name"), f"{name!r} is named twice")
            for i, n in enumerate(names):
                if n in seen:
                    raise self.fail(
                        gat.item("feature_names", i),
                        f"{n!r} is listed twice (a feature is in one group here)",
                    )
                seen.add(n)
            out.append((name, names))
        return out

    def _feature_configs(
        self, root: _At, groups: list[tuple[str, list[str]]]
    ) -> dict[str, tuple[Any, _At]]:
        items = [
            (fc, root.item("feature_configs", i)) for i, fc in enumerate(self.m.feature_configs)
        ]
        v2 = root("feature_config")
        items += [
            (fc, v2.item("features", i)) for i, fc in enumerate(self.m.feature_config.features)
        ]
        out: dict[str, tuple[Any, _At]] = {}
        for fc, at in items:
            if not fc.input_names:
                raise self.fail(at("input_names"), "required")
            if len(fc.input_names) > 1:
                raise self.fail(at.item("input_names", 1), "one input per feature is supported")
            name = fc.feature_name or fc.input_names[0]
            if name in out:
                raise self.fail(at, f"feature {name!r} is configured twice")
            out[name] = (fc, at)
        for gi, (_, names) in enumerate(groups):
            gat = _At()("model_config").item("feature_groups", gi)
            for i, n in enumerate(names):
                if n not in out:
                    raise self.fail(
                        gat.item("feature_names", i), f"{n!r} is not in the feature configs"
                    )
        return out

    def _feature(
        self,
        fc: Any,
        at: _At,
        columns: list[str] | None,
        defaults: dict[str, str],
        group: str,
    ) -> dict[str, Any]:
        name = fc.feature_name or fc.input_names[0]
        column = fc.input_names[0]
        if not _NAME.fullmatch(name):
            raise self.fail(
                at("feature_name" if fc.feature_name else "input_names"),
                f"{name!r}: feature names here are [A-Za-z_][A-Za-z0-9_]* (they name the "
                "serving inputs); set feature_name",
            )
        if columns is not None and column not in columns:
            raise self.fail(at("input_names"), f"{column!r} is not in data_config.input_fields")
        out: dict[str, Any] = {"name": name}
        if column != name:
            out["column"] = column
        raw_default = defaults.get(column, "")
        kind = fc.feature_type
        if kind == _enum("FeatureType", "RawFeature"):
            out["kind"] = "numeric"
            ignored = [
                k for k in ("hash_bucket_size", "num_buckets", "embedding_name") if fc.HasField(k)
            ]
            ignored += ["vocab_list"] if fc.vocab_list else []
            ignored += ["embedding_dim"] if fc.embedding_dim and not fc.boundaries else []
            if ignored:
                self.raw_ignored.append(f"{name} ({', '.join(ignored)})")
            try:
                out["default"] = float(raw_default) if raw_default != "" else 0.0
            except ValueError:
                raise self.fail(at, f"default_val {raw_default!r} is not a number") from None
            if fc.boundaries:
                bounds = sorted(fc.boundaries)  # EasyRec sorts them too
                if len(set(bounds)) != len(bounds):
                    raise self.fail(at("boundaries"), "a boundary is listed twice")
                if fc.embedding_dim < 1:
                    raise self.fail(at("embedding_dim"), "bucketised features need embedding_dim")
                out["boundaries"] = bounds
                out["embedding_dim"] = fc.embedding_dim
        else:
            tags = kind == _enum("FeatureType", "TagFeature")
            out["kind"] = "tags" if tags else "categorical"
            # EasyRec's precedence: hash_bucket_size, then vocab_list, then num_buckets.
            if fc.hash_bucket_size > 0:
                out["hash_buckets"] = fc.hash_bucket_size
            elif fc.vocab_list:
                vocab = list(fc.vocab_list)
                for i, v in enumerate(vocab):
                    if v == "" or v in vocab[:i]:
                        raise self.fail(
                            at.item("vocab_list", i), f"{v!r}: entries are distinct and not empty"
                        )
                out["vocab_list"] = vocab
                self._note_once(
                    "ids outside a vocab_list share one out-of-vocabulary row here (EasyRec maps "
                    "them to the first entry's row)"
                )
            elif fc.num_buckets > 0:
                if fc.num_buckets > MAX_NUM_BUCKETS:
                    raise self.fail(at("num_buckets"), f"at most {MAX_NUM_BUCKETS} here")
                out["num_buckets"] = fc.num_buckets
                self._note_once(
                    "ids outside [0, num_buckets) share one out-of-vocabulary row here (EasyRec "
                    "maps them to id 0's row)"
                )
            else:
                raise self.fail(
                    at, "needs hash_bucket_size, vocab_list or num_buckets (vocab_file is not read)"
                )
            if fc.embedding_dim < 1:
                raise self.fail(at("embedding_dim"), "required")
            out["embedding_dim"] = fc.embedding_dim
            if fc.embedding_name:
                if not _NAME.fullmatch(fc.embedding_name):
                    raise self.fail(
                        at("embedding_name"), f"{fc.embedding_name!r}: [A-Za-z_][A-Za-z0-9_]*"
                    )
                out["embedding_name"] = fc.embedding_name
            if tags:
                if fc.combiner not in ("mean", "sum"):
                    raise self.fail(at("combiner"), f"{fc.combiner!r}: mean or sum")
                out["separator"] = fc.separator
                out["pooling"] = fc.combiner
                out["max_len"] = TAG_MAX_LEN
                out["default"] = [t for t in raw_default.split(fc.separator) if t]
            else:
                out["default"] = raw_default
        if group != "all":
            out["group"] = group
        return out

    # ---------------------------------------------------------------------------- model

    def _backbone(
        self, mc: Any, mc_at: _At, group: str
    ) -> tuple[int | None, tuple[Any, _At] | None]:
        """(SENet reduction ratio or None, the MMoE keras layer and its path or None)."""
        at = mc_at("backbone")
        if not mc.HasField("backbone"):
            if mc.model_class == "MultiTaskModel":
                raise self.fail(at, "MultiTaskModel needs a backbone ending in a keras_layer MMoE")
            return None, None
        blocks = list(mc.backbone.blocks)
        if not blocks:
            raise self.fail(at("blocks"), "required")
        names: list[str] = []
        for i, b in enumerate(blocks):
            if not b.name or b.name in names:
                raise self.fail(at.item("blocks", i)("name"), "each block needs its own name")
            names.append(b.name)
        first, first_at = blocks[0], at.item("blocks", 0)
        if first.WhichOneof("layer") != "input_layer":
            raise self.fail(first_at, "the first block is an input_layer over the feature group")
        if (
            len(first.inputs) != 1
            or first.inputs[0].WhichOneof("name") != "feature_group_name"
            or first.inputs[0].feature_group_name != group
        ):
            raise self.fail(first_at("inputs"), f"the input_layer reads feature group {group!r}")
        senet: int | None = None
        mmoe: tuple[Any, _At] | None = None
        for i, b in enumerate(blocks[1:], start=1):
            bat = at.item("blocks", i)
            prev = names[i - 1]
            if (
                len(b.inputs) != 1
                or b.inputs[0].WhichOneof("name") != "block_name"
                or b.inputs[0].block_name != prev
            ):
                raise self.fail(bat("inputs"), f"blocks form a chain here: this one reads {prev!r}")
            if b.WhichOneof("layer") != "keras_layer":
                raise self.fail(bat, "only keras_layer blocks follow the input_layer")
            layer, lat = b.keras_layer, bat("keras_layer")
            params = layer.WhichOneof("params")
            if layer.class_name == "SENet":
                if i != 1:
                    raise self.fail(lat("class_name"), "SENet comes right after the input_layer")
                if params not in (None, "senet"):
                    raise self.fail(lat(params), "SENet takes senet { reduction_ratio }")
                senet = layer.senet.reduction_ratio
                if senet < 1:
                    raise self.fail(lat("senet")("reduction_ratio"), "at least 1")
            elif layer.class_name == "MMoE":
                if mc.model_class == "MMoE":
                    raise self.fail(
                        lat("class_name"),
                        "model_class MMoE has its experts in mmoe { }; a keras_layer MMoE needs "
                        "model_class MultiTaskModel",
                    )
                if i != len(blocks) - 1:
                    raise self.fail(lat("class_name"), "the MMoE block is the last block")
                if params != "mmoe":
                    raise self.fail(lat("mmoe"), "keras_layer MMoE needs mmoe { ... }")
                mmoe = (layer.mmoe, lat("mmoe"))
            else:
                raise self.fail(
                    lat("class_name"), f"{layer.class_name!r}: the keras layers here: SENet, MMoE"
                )
        concat = list(mc.backbone.concat_blocks)
        if concat and concat != [names[-1]]:
            raise self.fail(
                at("concat_blocks"), f"the backbone's output is its last block {names[-1]!r}"
            )
        if mc.model_class == "MultiTaskModel" and mmoe is None:
            raise self.fail(at("blocks"), "MultiTaskModel needs a keras_layer MMoE block last")
        return senet, mmoe

    def _dnn(self, dnn: Any, at: _At) -> dict[str, Any]:
        """EasyRec's DNN or MLP -> units, activation, dropout, batch_norm."""
        units = list(dnn.hidden_units)
        if dnn.activation not in ACTIVATIONS:
            raise self.fail(
                at("activation"), f"{dnn.activation!r}: one of {', '.join(sorted(ACTIVATIONS))}"
            )
        ratios = list(dnn.dropout_ratio)
        if ratios and (len(set(ratios)) > 1 or len(ratios) != len(units)):
            raise self.fail(at("dropout_ratio"), "one ratio for every layer is supported")
        dropout = ratios[0] if ratios else 0.0
        if not 0 <= dropout < 1:
            raise self.fail(at("dropout_ratio"), "in [0, 1)")
        return {
            "units": units,
            "activation": ACTIVATIONS[dnn.activation],
            "dropout": dropout,
            "batch_norm": dnn.use_bn,
        }

    def _towers(
        self, towers: list[tuple[Any, _At]], expert: dict[str, Any], columns: list[str] | None
    ) -> list[dict[str, Any]]:
        labels = list(self.m.data_config.label_fields)
        eval_metrics = [
            _METRICS[m.WhichOneof("metric")]
            for m in self.m.eval_config.metrics_set
            if m.WhichOneof("metric") is not None
        ]
        out = []
        for i, (t, tat) in enumerate(towers):
            if not _NAME.fullmatch(t.tower_name):
                raise self.fail(tat("tower_name"), f"{t.tower_name!r}: [A-Za-z_][A-Za-z0-9_]*")
            if t.label_name:
                label, label_at = t.label_name, tat("label_name")
            elif i < len(labels):
                label, label_at = labels[i], _At()("data_config").item("label_fields", i)
            else:
                raise self.fail(
                    tat("label_name"),
                    f"unset, and data_config.label_fields has no entry {i} for it",
                )
            if columns is not None and label not in columns:
                raise self.fail(label_at, f"{label!r} is not in data_config.input_fields")
            task: dict[str, Any] = {"name": t.tower_name, "label": label}
            loss_type = self._losses(t, tat, task)
            if loss_type == _enum("LossType", "L2_LOSS"):
                if t.num_class != 1:
                    raise self.fail(tat("num_class"), "regression (L2_LOSS) towers have 1")
                task["kind"] = "regression"
            elif t.num_class == 1:
                task["kind"] = "binary"
            elif t.num_class >= 2:
                task.update(kind="multiclass", num_class=t.num_class)
            else:
                raise self.fail(tat("num_class"), "at least 1")
            if t.weight < 0:
                raise self.fail(tat("weight"), "not negative")
            task["weight"] = t.weight
            if t.HasField("dnn"):
                dnn = self._dnn(t.dnn, tat("dnn"))
                for key, field_name in (
                    ("activation", "activation"),
                    ("dropout", "dropout_ratio"),
                    ("batch_norm", "use_bn"),
                ):
                    if dnn[key] != expert[key]:
                        raise self.fail(
                            tat("dnn")(field_name),
                            f"differs from the experts' ({expert[key]} there, {dnn[key]} here): "
                            f"this project has one {key} for experts and towers",
                        )
                task["tower"] = dnn["units"]
            else:
                task["tower"] = []
            kind = task["kind"]
            if t.metrics_set:
                metrics = []
                for j, m in enumerate(t.metrics_set):
                    which = m.WhichOneof("metric")
                    if which is None:
                        raise self.fail(tat.item("metrics_set", j), "names no metric")
                    if _METRICS[which] not in _APPLIES[kind]:
                        raise self.fail(
                            tat.item("metrics_set", j), f"{which} does not apply to a {kind} task"
                        )
                    metrics.append(_METRICS[which])
            else:
                metrics = [m for m in eval_metrics if m in _APPLIES[kind]] or [
                    _DEFAULT_METRIC[kind]
                ]
            task["metrics"] = list(dict.fromkeys(metrics))
            out.append(task)
        return out

    def _losses(self, t: Any, at: _At, task: dict[str, Any]) -> int:
        """A tower's `losses` (EasyRec's several losses per tower) as task.losses; returns the
        pointwise loss type that sets the task's kind."""
        pairwise = _enum("LossType", "PAIR_WISE_LOSS")
        if not t.losses:
            if t.loss_type == pairwise:
                task["losses"] = [{"kind": "pairwise"}]
                return int(_enum("LossType", "CLASSIFICATION"))
            return int(t.loss_type)
        terms: list[dict[str, Any]] = []
        pointwise: list[int] = []
        for j, loss in enumerate(t.losses):
            lat = at.item("losses", j)
            if loss.weight < 0:
                raise self.fail(lat("weight"), "not negative")
            if loss.loss_type == pairwise:
                terms.append({"kind": "pairwise", "weight": loss.weight})
                if loss.pairwise_loss.margin:
                    terms[-1]["margin"] = loss.pairwise_loss.margin
                continue
            if loss.HasField("pairwise_loss"):
                raise self.fail(lat("pairwise_loss"), "only for loss_type PAIR_WISE_LOSS")
            if pointwise and loss.loss_type != pointwise[0]:
                raise self.fail(lat("loss_type"), "one pointwise loss type per tower here")
            pointwise.append(loss.loss_type)
            terms.append({"kind": "pointwise", "weight": loss.weight})
        task["losses"] = terms
        if any(term["kind"] == "pairwise" for term in terms):
            self._note_once(
                "PAIR_WISE_LOSS: softplus(margin - (z_i - z_j)) over the pairs of each batch's "
                "rows whose labels differ, as a term of the tower's loss (tasks[i].losses)"
            )
        return pointwise[0] if pointwise else int(_enum("LossType", "CLASSIFICATION"))

    def _optimizer(self, root: _At) -> dict[str, Any]:
        tc, at = self.m.train_config, root("train_config")
        optimizers = list(tc.optimizer_config)
        if not optimizers:
            return {}
        if len(optimizers) > 1:
            raise self.fail(at.item("optimizer_config", 1), "one optimizer is supported")
        o, oat = optimizers[0], at.item("optimizer_config", 0)
        if o.WhichOneof("optimizer") is None:
            raise self.fail(oat("adam_optimizer"), "required (the optimizer supported here)")
        if o.use_moving_average:
            raise self.fail(
                oat("use_moving_average"), "moving averages of the weights are not supported"
            )
        lr, lat = o.adam_optimizer.learning_rate, oat("adam_optimizer")("learning_rate")
        which = lr.WhichOneof("learning_rate")
        if which == "constant_learning_rate":
            return {"optimizer": "adam", "lr": lr.constant_learning_rate.learning_rate}
        if which == "exponential_decay_learning_rate":
            e, eat = lr.exponential_decay_learning_rate, lat("exponential_decay_learning_rate")
            if e.decay_steps < 1:
                raise self.fail(eat("decay_steps"), "at least 1")
            if not 0 < e.decay_factor <= 1:
                raise self.fail(eat("decay_factor"), "in (0, 1]")
            return {
                "optimizer": "adam",
                "lr": e.initial_learning_rate,
                "lr_schedule": "exponential",
                "decay_steps": e.decay_steps,
                "decay_factor": e.decay_factor,
                "staircase": e.staircase,
                "min_lr": e.min_learning_rate,
            }
        raise self.fail(lat, "needs constant_learning_rate or exponential_decay_learning_rate")

    def _note_ignored_raw_options(self) -> None:
        if self.raw_ignored:
            self.notes.append(
                "RawFeature options ignored, as EasyRec ignores them: "
                f"{'; '.join(self.raw_ignored)}"
                " (EasyRec hashes and looks up no raw value; an embedding_dim without boundaries "
                "at most scales a learned vector by the value, a linear map that the first "
                "layer's weights already are: the value enters as it is)"
            )

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


def _enum(enum: str, value: str) -> int:
    return dict(ENUMS[enum])[value]
