"""The workflow config: JSON-schema validation with defaults, and typed views of each section.

Snakemake's common.smk calls `resolve()` before any job runs; the stage code (and the demo's
archive builder) use the same functions, so a setting means the same thing everywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from .base_model import TINY_BASES
from .errors import UserError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


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


def resolve(config: dict, require_data: bool = True) -> dict:
    """Validate `config` in place against the schema (filling defaults); raise ConfigError by key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_message(error) for error in errors))
    for name, model in config["models"].items():
        if model["base"] in TINY_BASES:
            tiny_spec(config, name)
    if require_data:
        check_data_paths(config)
    return config


def data_paths(config: dict) -> dict[str, str]:
    """Each data key of the config (dotted) -> what it must name."""
    paths = {"noteevents": "path to NOTEEVENTS.csv or .csv.gz"}
    paths.update(
        {
            f"models.{name}.base": f"the {name} base model's folder in HF format, 'tiny' or 'tiny-llama3'"
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


def note_policy(config: dict):
    from .notes import NotePolicy

    section = config["notes"]
    exclude = frozenset()
    if section["exclude_row_ids"]:
        path = Path(section["exclude_row_ids"])
        try:
            exclude = frozenset(int(line) for line in path.read_text().split())
        except ValueError as err:
            raise ConfigError(
                f"config key notes.exclude_row_ids: {path} must hold one integer ROW_ID per line ({err})"
            ) from None
    return NotePolicy(
        drop_iserror=section["drop_iserror"],
        keep_addenda=section["keep_addenda"],
        drop_duplicate_text=section["drop_duplicate_text"],
        coarse_placeholders=section["coarse_placeholders"],
        exclude_row_ids=exclude,
    )


def split_policy(config: dict):
    from .notes import SplitPolicy

    return SplitPolicy(heldout_notes=config["notes"]["heldout_notes"], seed=config["seed"])


def generation_settings(config: dict):
    from .instructions import GenerationSettings
    from .tasks import DEFAULT_SEED_QUESTIONS

    section = config["instructions"]
    return GenerationSettings(
        seed=config["seed"],
        pool_lag=section["pool_lag"],
        near_duplicate_rouge=section["near_duplicate_rouge"],
        seed_questions=section["seed_questions"] or DEFAULT_SEED_QUESTIONS,
    )


def llm_settings(config: dict):
    from .llm import LLMSettings

    return LLMSettings.from_config(config["llm"])


def base_dir(config: dict, name: str) -> str | None:
    """The base model folder of model `name`: built under results/ for a tiny base, else the configured one."""
    base = config["models"][name]["base"]
    return f"results/base_models/{name}" if base in TINY_BASES else base


def tiny_spec(config: dict, name: str) -> dict:
    """The tiny base of model `name`: the tiny_model section with models.NAME.tiny_model over it
    (TinyLlamaSpec's fields; the family comes from `base`, TINY_BASES), checked against the schema."""
    spec = {**config["tiny_model"], **config["models"][name].get("tiny_model", {})}
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["$defs"]["tiny_model"]
    for error in jsonschema.Draft202012Validator(schema).iter_errors(spec):
        # The section itself passed `resolve`, so what fails here is the model's override.
        where = ".".join(["models", name, "tiny_model", *map(str, error.absolute_path)])
        raise ConfigError(f"config key {where}: {_message(error).removeprefix(f'config key {_key(error)}: ')}")
    return spec


def base_context(config: dict, name: str) -> int | None:
    """Positions the base of model `name` has; None while a real base folder is not there yet."""
    base = config["models"][name]["base"]
    if base in TINY_BASES:
        return tiny_spec(config, name)["max_position_embeddings"]
    if not base or not (Path(base) / "config.json").exists():
        return None
    from .base_model import describe_base

    try:
        return describe_base(base).context_length
    except UserError as error:
        raise ConfigError(f"config key models.{name}.base: {error}") from None


# Training keys that only one stage reads; elsewhere they are an error rather than silently unused.
STAGE_ONLY_KEYS = {"truncation": "finetune", "note_attention": "pretrain"}


def training_settings(config: dict, stage: str, name: str, context: int | None = None) -> dict:
    """The stage's settings with model `name`'s overrides applied; unknown keys name their place.

    `max_length` is a cap: the model trains at the smaller of it and its base's context (given, or
    `base_context`), so LLaMA-1 keeps 2048 and Llama-3 gets its 8,192 under one config.
    """
    merged = {**config[stage], **config["models"][name].get(stage, {})}
    allowed = set(yaml.safe_load(SCHEMA_PATH.read_text())["$defs"]["training"]["properties"])
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise ConfigError(f"config key models.{name}.{stage}: unknown key(s) {', '.join(unknown)}")
    for key in sorted(merged.keys() & STAGE_ONLY_KEYS.keys()):
        if STAGE_ONLY_KEYS[key] != stage:
            raise ConfigError(f"config key {stage}.{key}: a {STAGE_ONLY_KEYS[key]} setting only")
    context = context or base_context(config, name)
    lengths = [n for n in (merged.get("max_length"), context) if n is not None]
    if not lengths:
        raise ConfigError(
            f"config key models.{name}.{stage}.max_length: the base folder is not there to read its context "
            f"from; set {stage}.max_length"
        )
    return {"seed": config["seed"], **merged, "max_length": min(lengths)}


def release_names(name: str) -> tuple[str, str]:
    """(pretrained-only, fine-tuned) release names of model `name`."""
    return f"Asclepius-R-{name}-Pretrained-Only", f"Asclepius-R-{name}"


# The evaluation's name for a model's base, beside its Asclepius-R checkpoints.
BASE_PREFIX = "Base-"


def evaluated_models(config: dict) -> list[str]:
    """Every model the evaluation compares: per configured model its base, pretrained-only and
    Asclepius-R, then the extra models."""
    names = [n for name in config["models"] for n in (BASE_PREFIX + name, *release_names(name))]
    return names + list(config["evaluate"]["extra_models"])


def truncation_policy(config: dict) -> str:
    """finetune.truncation, which also shapes evaluation prompts."""
    from .prompts import DEFAULT_TRUNCATION

    return config["finetune"].get("truncation", DEFAULT_TRUNCATION)


def decoding_settings(section: dict):
    """The evaluate section's decoding settings."""
    from .generation import Decoding

    return Decoding(
        max_new_tokens=section["max_new_tokens"],
        num_beams=section["num_beams"],
        do_sample=section["do_sample"],
        temperature=section["temperature"],
    )
