"""EasyRec pipeline configs (protobuf text format) -> this project's YAML config.

`mmoe train --config pipeline.config` and `mmoe convert-config` read a pipeline.config with
protobuf's `text_format` against the subset of EasyRec's messages in `model/easyrec_proto.py`,
and translate it into the YAML form (`model/config.py`, the one internal form). Two model forms
are read: the built-in `model_class: "MMoE"` (`mmoe { expert_dnn, num_expert, task_towers }`,
optionally behind a backbone of input_layer -> SENet), and the component form
`model_class: "MultiTaskModel"` (backbone blocks input_layer -> [SENet] -> MMoE,
`model_params.task_towers`). A field this project does not read fails with its line; a value it
cannot honour (a second feature group, per-layer dropout ratios, ...) fails with the field's
path and line. What the translation had to decide is returned as notes. docs/easyrec.md has the
whole mapping.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from mmoe.model.config import MAX_NUM_BUCKETS, ConfigError, RunConfig, parse_config
from mmoe.model.easyrec_proto import ENUMS, new_pipeline_config, supported_fields
from mmoe.model.overrides import apply_overrides, parse_key

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
    # train_config.num_steps and data_config.num_epochs (0: unset): epochs over the data given
    num_steps: int = 0
    num_epochs: int = 0
    num_steps_line: int | None = None

    def epochs_over(
        self, config: RunConfig, data: str | Path | None, valid: str | Path | None
    ) -> tuple[int, str]:
        """train.epochs for num_steps (and num_epochs) over the training data, and a note."""
        if not self.num_steps:
            return self.num_epochs, f"data_config.num_epochs {self.num_epochs}: train.epochs"
        if data is None:
            where = f"{self.source}:{self.num_steps_line}" if self.num_steps_line else self.source
            raise EasyRecConfigError(
                f"{where}: train_config.num_steps: {self.num_steps} steps become epochs over the "
                "training data; give the data (--data), or set train.epochs=N"
            )
        from mmoe.model.data import DataSource

        rows = DataSource(data, config).count_rows()
        t = config.train
        train_rows = rows if valid is not None else rows - int(rows * t.valid_fraction)
        per_epoch = max(1, math.ceil(train_rows / t.batch_size))
        epochs = max(1, round(self.num_steps / per_epoch))
        if self.num_epochs:
            epochs = min(epochs, self.num_epochs)
        note = (
            f"train_config.num_steps {self.num_steps}: {epochs} epoch(s) of {per_epoch} steps "
            f"({train_rows} training rows of {data}, batches of {t.batch_size})"
        )
        return epochs, note


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


def translate(text: str, source: str = "pipeline.config") -> Translation:
    """A pipeline.config's text -> its Translation (raises EasyRecConfigError)."""
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
    path: str | Path,
    overrides: Sequence[str] = (),
    data: str | Path | None = None,
    valid: str | Path | None = None,
) -> tuple[RunConfig, dict[str, Any], list[str]]:
    """Translate, apply `key=value` overrides to the YAML form, turn num_steps into epochs over
    `data` (unless train.epochs is overridden) and validate: (config, its YAML form, notes)."""
    translation = translate_file(path)
    mapping = apply_overrides(translation.config, overrides)
    config = _validated(mapping, path)
    notes = list(translation.notes)
    epochs_given = any(
        parse_key(o.partition("=")[0].strip()) == ["train", "epochs"] for o in overrides
    )
    if not epochs_given and (translation.num_steps or translation.num_epochs):
        epochs, note = translation.epochs_over(config, data, valid)
        mapping.setdefault("train", {})["epochs"] = epochs
        config = _validated(mapping, path)
        notes.append(note)
    return config, mapping, notes


def _validated(mapping: dict[str, Any], path: str | Path) -> RunConfig:
    try:
        return parse_config(mapping)
    except ConfigError as err:
        raise ConfigError(f"{path} (in its YAML form): {err}") from None


class _Translator:
    def __init__(self, message: Any, lines: dict[Key, int], source: str) -> None:
        self.m = message
        self.lines = lines
        self.source = source
        self.notes: list[str] = []

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
        if mc.model_class not in ("MMoE", "MultiTaskModel"):
            raise self.fail(
                mc_at("model_class"),
                f"{mc.model_class!r}: this project trains MMoE, and MultiTaskModel with a "
                "keras_layer MMoE block",
            )
        columns, defaults, data_section = self._data(root("data_config"))
        group_name, names = self._group(mc, mc_at)
        configured = self._feature_configs(root)
        features = []
        for name in names:
            fc, at = configured[name]
            features.append(self._feature(fc, at, columns, defaults, group_name))
        senet, mmoe_layer = self._backbone(mc, mc_at, group_name)
        if mc.model_class == "MMoE":
            if mc.WhichOneof("model") != "mmoe":
                raise self.fail(mc_at("mmoe"), "model_class MMoE needs mmoe { ... }")
            experts_at = mc_at("mmoe")
            if mc.mmoe.num_expert < 1:
                raise self.fail(experts_at("num_expert"), "at least 1 expert")
            num_experts = mc.mmoe.num_expert
            expert = self._dnn(mc.mmoe.expert_dnn, experts_at("expert_dnn"))
            towers, towers_at = list(mc.mmoe.task_towers), experts_at
            l2 = mc.mmoe.l2_regularization
        else:
            if mc.WhichOneof("model") != "model_params":
                raise self.fail(mc_at("model_params"), "MultiTaskModel needs model_params")
            assert mmoe_layer is not None
            layer, layer_at = mmoe_layer
            if layer.num_expert < 1:
                raise self.fail(layer_at("num_expert"), "at least 1 expert")
            num_experts = layer.num_expert
            expert = self._dnn(layer.expert_mlp, layer_at("expert_mlp"))
            towers, towers_at = list(mc.model_params.task_towers), mc_at("model_params")
            if layer.num_task != len(towers):
                raise self.fail(
                    layer_at("num_task"),
                    f"{layer.num_task} tasks, but model_params has {len(towers)} task_towers",
                )
            l2 = mc.model_params.l2_regularization
        if not expert["units"]:
            at = experts_at("expert_dnn") if mc.model_class == "MMoE" else layer_at("expert_mlp")
            raise self.fail(at("hidden_units"), "experts need at least one hidden layer")
        batch_size = data_section.pop("batch_size")
        tasks = self._towers(towers, towers_at, expert, columns)
        model: dict[str, Any] = {
            "experts": num_experts,
            "expert_units": expert["units"],
            "gate_units": [],
            "activation": expert["activation"],
            "dropout": expert["dropout"],
            "batch_norm": expert["batch_norm"],
            # TensorFlow's l2 regulariser is scale * sum(w^2) / 2; here l2 * sum(w^2).
            "l2": l2 / 2,
            # EasyRec: scale * sum(e^2) / 2 over the batch's embedded features; here
            # embedding_l2 * sum(e^2) / batch_size.
            "embedding_l2": mc.embedding_regularization * batch_size / 2,
        }
        if l2 or mc.embedding_regularization:
            self.notes.append(
                f"l2_regularization {l2:g} and embedding_regularization "
                f"{mc.embedding_regularization:g} are EasyRec's TensorFlow penalties (half the "
                f"sum of squares; embeddings summed over the batch): model.l2 "
                f"{model['l2']:g} and model.embedding_l2 {model['embedding_l2']:g} here (for "
                f"batches of {batch_size})"
            )
        if senet is not None:
            model["senet"] = {"reduction_ratio": senet}
            self.notes.append(
                "SENet is FiBiNET's (one squeeze per feature, no skip connection or layer norm), "
                "not the grouped SENet of EasyRec's keras layer"
            )
        train = {"batch_size": batch_size, **data_section, **self._optimizer(root)}
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
        if m.train_input_path or m.eval_input_path or m.model_dir:
            self.notes.append(
                "train_input_path, eval_input_path and model_dir are not read: mmoe train takes "
                "--data, --valid and --out"
            )
        tc_at = root("train_config")
        return Translation(
            config,
            self.notes,
            self.source,
            num_steps=m.train_config.num_steps,
            num_epochs=m.data_config.num_epochs,
            num_steps_line=self.line(tc_at("num_steps")) or self.line(tc_at),
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

    def _group(self, mc: Any, at: _At) -> tuple[str, list[str]]:
        groups = mc.feature_groups
        if len(groups) != 1:
            where = at.item("feature_groups", 1) if groups else at("feature_groups")
            raise self.fail(where, "one feature group feeds the model here (EasyRec's MMoE: 'all')")
        g, gat = groups[0], at.item("feature_groups", 0)
        names = list(g.feature_names)
        if not names:
            raise self.fail(gat("feature_names"), "required")
        for i, n in enumerate(names):
            if n in names[:i]:
                raise self.fail(gat.item("feature_names", i), f"{n!r} is listed twice")
        return g.group_name or "all", names

    def _feature_configs(self, root: _At) -> dict[str, tuple[Any, _At]]:
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
        group = self.m.model_config.feature_groups
        if group:
            gat = _At()("model_config").item("feature_groups", 0)
            for i, n in enumerate(group[0].feature_names):
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
            for unused in ("hash_bucket_size", "num_buckets", "embedding_name"):
                if fc.HasField(unused):
                    raise self.fail(at(unused), "not used by a RawFeature")
            if fc.vocab_list:
                raise self.fail(at("vocab_list"), "not used by a RawFeature")
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
            elif fc.embedding_dim:
                raise self.fail(
                    at("embedding_dim"),
                    "a RawFeature without boundaries enters the network as its value here; "
                    "EasyRec's projection of it to embedding_dim is not supported (remove "
                    "embedding_dim, or give boundaries)",
                )
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
        self, towers: list[Any], at: _At, expert: dict[str, Any], columns: list[str] | None
    ) -> list[dict[str, Any]]:
        if not towers:
            raise self.fail(at("task_towers"), "required")
        labels = list(self.m.data_config.label_fields)
        eval_metrics = [
            _METRICS[m.WhichOneof("metric")]
            for m in self.m.eval_config.metrics_set
            if m.WhichOneof("metric") is not None
        ]
        out = []
        for i, t in enumerate(towers):
            tat = at.item("task_towers", i)
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
            if t.loss_type == _enum("LossType", "L2_LOSS"):
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

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


def _enum(enum: str, value: str) -> int:
    return dict(ENUMS[enum])[value]
