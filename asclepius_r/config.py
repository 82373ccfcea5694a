"""The workflow config: loading, layering and JSON-schema validation with the schema's defaults.

The schema (schemas/config.schema.yaml) is the one place a default is written. Snakemake's
common.smk calls `resolve()` before any job runs; each stage then reads its own section
(`Settings.from_config(section)` in the stage's package). This module imports no stage.

Every key of the schema is classed (`x-operational`): operational keys say how a run goes,
the others what it makes. Rule params are `determining(...)`, the part of a section that
determines outputs, so Snakemake reruns a job for those keys only; the job reads the whole
config (`snakemake.config`) for the rest.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import yaml

from asclepius_r.errors import UserError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"
OPERATIONAL = "x-operational"  # schema annotation: true for a key that cannot change what the workflow makes
KEYS_OF = "x-keys"  # schema annotation: an object whose keys are those of another definition


class ConfigError(UserError, ValueError):
    """A config value that is missing or wrong; the message names the key."""


def _with_defaults(validator_class):
    """A validator that fills in each property's `default` before checking it."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_defaults})


def _key(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"config key {_key(error)}: unknown key(s) {', '.join(extra)}"
    if "propertyNames" in error.schema_path:
        # jsonschema reports the bad name against the pattern, which does not say what is allowed.
        return (
            f"config key {_key(error)}: model name {error.instance!r} is not allowed; a name is used in paths, "
            "wildcards, dotted config keys and release names (Asclepius-R-NAME): letters, digits and '_', in parts "
            "joined by single '-', at most 64 characters, not ending in -Pretrained-Only (e.g. 7B, llama3-8B)"
        )
    return f"config key {_key(error)}: {error.message}"


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


@functools.cache
def _read_only_schema() -> dict:
    """The schema read once, for lookups that never hand it on (the validator fills defaults into its copy)."""
    return schema()


def _definition(node: dict) -> dict:
    """A schema node with its `$ref` or `x-keys` followed (`#/$defs/NAME`)."""
    pointer = node.get("$ref") or node.get(KEYS_OF)
    return _read_only_schema()["$defs"][pointer.removeprefix("#/$defs/")] if pointer else node


def config_keys(node: dict | None = None, where: str = "") -> Iterator[tuple[str, dict]]:
    """Every key of the schema, dotted (`llm.max_concurrency`, `models.*.pretrain.learning_rate`; `*`
    for a model's name), with its schema. A key is classed (`x-operational`), or an object whose
    keys are."""
    node = _definition(_read_only_schema() if node is None else node)
    children = dict(node.get("properties", {}))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and not children:
        children = {"*": extra}
    for name, sub in children.items():
        key = f"{where}{name}"
        if OPERATIONAL in sub:
            yield key, sub
            continue
        inner = _definition(sub)
        if not inner.get("properties") and not isinstance(inner.get("additionalProperties"), dict):
            raise ValueError(f"{SCHEMA_PATH.name}: config key {key} is not classed ({OPERATIONAL}: true or false)")
        yield from config_keys(inner, key + ".")


def _strip_operational(value, node: dict):
    node = _definition(node)
    if not isinstance(value, dict):
        return value
    properties = node.get("properties")
    if properties is None:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and OPERATIONAL not in extra:
            return {name: _strip_operational(value[name], extra) for name in sorted(value)}
        return value
    kept = {}
    for name, v in sorted(value.items()):
        sub = properties.get(name, {})
        if not sub.get(OPERATIONAL, False):
            kept[name] = v if OPERATIONAL in sub else _strip_operational(v, sub)
    return kept


def determining(section: dict, where: str) -> dict:
    """What of a config section determines the workflow's outputs: its operational keys (schema
    `x-operational: true`) left out, here and in nested sections. `where` is the section's key
    (`llm`, `evaluate`) or a definition (`#/$defs/training`); "" is the whole config. This is what
    rule params hold: Snakemake reruns a job whose params changed, as it compares their repr, so
    keys come sorted (an override given on the command line adds its keys last)."""
    node = {"$ref": where} if where.startswith("#/") else _read_only_schema()
    for part in where.split(".") if where and not where.startswith("#/") else []:
        node = node["properties"][part]
    return _strip_operational(section, node)


def check_section(value: dict, definition: str, where: str) -> None:
    """Check `value` against the schema's `$defs/<definition>`; the error names the key under `where`."""
    for error in jsonschema.Draft202012Validator(schema()["$defs"][definition]).iter_errors(value):
        key = ".".join([where, *map(str, error.absolute_path)])
        raise ConfigError(f"config key {key}: {_message(error).removeprefix(f'config key {_key(error)}: ')}")


def resolve(config: dict, require_data: bool = True) -> dict:
    """Validate `config` in place against the schema (filling defaults); raise ConfigError by key."""
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_message(error) for error in errors))
    if require_data:
        check_data_paths(config)
    return config


def defaults(section: str | None = None, **values) -> dict:
    """The schema's defaults with `values` laid over them and checked: one section's (`llm`,
    `pretrain`, `tiny_model`), or the whole config's, where `values` are sections. This is how code
    and tests outside a workflow get settings (`LLMSettings.from_config(defaults("llm", ...))`)
    without writing a default a second time; a workflow reads its resolved config instead."""
    config = {section: values} if section else dict(values)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    # The data keys (noteevents, models) have no default; only a workflow's config names them.
    errors = [e for e in validator.iter_errors(config) if not (e.validator == "required" and not e.absolute_path)]
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_message(error) for error in errors))
    return config[section] if section else config


def data_paths(config: dict) -> dict[str, str]:
    """Each data key of the config (dotted) -> what it must name."""
    paths = {"noteevents": "path to NOTEEVENTS.csv or .csv.gz"}
    paths.update(
        {
            f"models.{name}.base": (
                f"the {name} base model's folder in HF format, a LLaMA .gguf file, 'smollm2', 'tiny' or 'tiny-llama3'"
            )
            for name in config["models"]
        }
    )
    return paths


def config_value(config: dict, key: str):
    """The value at a dotted key (`models.7B.base`), None where any part is missing."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_data_paths(config: dict, needed: list[str] | None = None) -> None:
    """Raise, saying what to set, if a data key in `needed` (default: all of them) is not set.

    A single stage needs only its own: the notes stage asks for `noteevents`, not the models.
    """
    described = data_paths(config)
    unset = [key for key in (needed or described) if not config_value(config, key)]
    if not unset:
        return
    later = [key for key in described if key not in unset and not config_value(config, key)]
    raise ConfigError(
        "config.yaml is the paper run and needs real inputs; set:\n  "
        + "\n  ".join(f"{key} ({described[key]})" for key in unset)
        + "\n(edit config.yaml or pass --config noteevents=PATH). "
        + (f"Also unset, for other stages: {', '.join(later)}. " if later else "")
        + "To try the workflow without MIMIC data, run `make demo`: it needs no data."
    )


def load(path: str | Path, require_data: bool = True) -> dict:
    return resolve(yaml.safe_load(Path(path).read_text()) or {}, require_data)


def merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, section by section, as Snakemake merges --configfile."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_layers(paths: list[str | Path], require_data: bool = False) -> dict:
    """Config files laid one over another (like repeated `snakemake --configfile`), then resolved."""
    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return resolve(config, require_data)


def release_names(name: str) -> tuple[str, str]:
    """(pretrained-only, fine-tuned) release names of model `name`."""
    return f"Asclepius-R-{name}-Pretrained-Only", f"Asclepius-R-{name}"


# The evaluation's name for a model's base, beside its Asclepius-R checkpoints.
BASE_PREFIX = "Base-"


def configured_model(config: dict, evaluated: str) -> str | None:
    """The configured model (models.NAME) an evaluated model comes from: Base-NAME,
    Asclepius-R-NAME-Pretrained-Only and Asclepius-R-NAME are NAME's; an extra model is none."""
    for name in config["models"]:
        if evaluated in (BASE_PREFIX + name, *release_names(name)):
            return name
    return None


def evaluated_models(config: dict) -> list[str]:
    """Every model the evaluation compares: per configured model its base, pretrained-only and
    Asclepius-R, then the extra models."""
    names = [n for name in config["models"] for n in (BASE_PREFIX + name, *release_names(name))]
    return names + list(config["evaluate"]["extra_models"])
