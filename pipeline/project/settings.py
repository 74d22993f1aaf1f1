"""Every setting checked once, before a stage or the Python API does any work
(docs/parameters.md): one line per bad value, naming the setting, what it holds
and what it may hold. Without these checks a zero learning rate or an empty hidden
layer trained a model at chance level and reported success, and a model name with
`../` wrote the model files outside the project."""

import re
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.data.images import CROP_AND_SCALE, SettingError

Check = Callable[[object], bool]


def integer(minimum: int) -> tuple[Check, str]:
    def check(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    return check, f"a whole number >= {minimum}"


def number(minimum: float, above: bool = False) -> tuple[Check, str]:
    def check(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return value > minimum if above else value >= minimum

    return check, f"a number {'>' if above else '>='} {minimum}"


def one_of(*choices) -> tuple[Check, str]:
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


def auto_or(check: tuple[Check, str]) -> tuple[Check, str]:
    return lambda v: v == "auto" or check[0](v), f"auto or {check[1]}"


def boolean() -> tuple[Check, str]:
    return lambda v: isinstance(v, bool), "true or false"


def fraction_below_one() -> tuple[Check, str]:
    return lambda v: number(0)[0](v) and v < 1, "a fraction in [0, 1)"


def share() -> tuple[Check, str]:
    return lambda v: number(0, above=True)[0](v) and v <= 1, "a share in (0, 1]"


def none_or_text() -> tuple[Check, str]:
    return lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null or an address (text)"


def port() -> tuple[Check, str]:
    return lambda v: integer(1)[0](v) and v <= 65535, "a port number, 1 to 65535"


def layer_sizes() -> tuple[Check, str]:
    return lambda v: isinstance(v, list) and all(integer(1)[0](n) for n in v), "a list of layer sizes >= 1"


# Xcode turns the model's file name into a Swift class: it must be an identifier,
# which also keeps it from naming a path (`../x`).
SWIFT_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# S3's rules for a bucket name: 3-63 lowercase letters, digits, dots and hyphens.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_name() -> tuple[Check, str]:
    return lambda v: v is None or (isinstance(v, str) and bool(BUCKET_NAME.match(v))), "an S3 bucket name"


def s3_url_or_null() -> tuple[Check, str]:
    return lambda v: v is None or (isinstance(v, str) and v.startswith("s3://")), "an s3:// URL or null"


def tracking_uri() -> tuple[Check, str]:
    # sqlite:///mlflow.db, http://host:port, file:/path, postgresql://...: a scheme and more
    return (
        lambda v: isinstance(v, str) and bool(re.match(r"^[a-z][a-z0-9+.-]*:.+", v)),
        "an MLflow tracking URI",
    )


RULES: dict[str, tuple[Check, str]] = {
    "data.max_image_pixels": integer(1),
    "split.validation": auto_or(fraction_below_one()),
    "split.seed": integer(0),
    "extractor.layers": one_of("last", "every_stage"),  # what features/backbone.py pools
    "extract.crop_and_scale": one_of(*CROP_AND_SCALE),
    "extract.runtime": one_of("auto", "onnxruntime", "torch"),
    "extract.batch_size": integer(1),
    "extract.workers": auto_or(integer(1)),
    "extract.engine": one_of("local", "ray"),
    "extract.ray_address": none_or_text(),
    "head.type": one_of("logistic", "mlp"),
    "head.hidden_sizes": layer_sizes(),
    "head.dropout": fraction_below_one(),
    "train.max_iterations": integer(1),
    "train.regularization": auto_or(number(0)),
    "train.cv_folds": integer(2),
    "train.batch_size": integer(1),
    "train.learning_rate": number(0, above=True),
    "train.class_weighting": boolean(),
    "train.early_stopping_patience": integer(0),
    "train.feature_batch_rows": integer(1),
    "train.seed": integer(0),
    "calibrate.temperature": auto_or(number(0, above=True)),
    "calibrate.keep": share(),
    "evaluate.min_images_to_judge": integer(0),
    "audit.label_issues_listed": integer(0),
    "audit.near_duplicate_similarity": share(),
    "audit.outliers": integer(0),
    "audit.images_shown": integer(0),
    "model.name": (lambda v: isinstance(v, str) and bool(SWIFT_IDENTIFIER.match(v)), "a Swift identifier"),
    "model.precision": one_of("float32", "float16", "int8"),
    "retrain.margin": number(0),
    "app.port": port(),
    "app.top_k": integer(1),
    "app.nearest": integer(0),
    "app.runs_compared": integer(0),
    "storage.type": one_of("local", "s3"),
    "storage.bucket": bucket_name(),
    "storage.dvc_remote": s3_url_or_null(),
    "storage.mlflow_tracking_uri": tracking_uri(),
}


def storage_problems(cfg: DictConfig) -> list[str]:
    """storage=s3 needs a bucket, and an MLflow server: a local store would keep the
    artifacts on this machine (docs/scaling-out.md)."""
    storage = cfg.get("storage")
    if storage is None or storage.get("type") != "s3":
        return []
    found = []
    if storage.get("bucket") is None:
        found.append("storage.bucket = None: expected an S3 bucket name with storage=s3")
    uri = OmegaConf.select(cfg, "storage.mlflow_tracking_uri", default=None)
    if isinstance(uri, str) and not uri.startswith(("http://", "https://")):
        expected = "expected an MLflow server's http(s):// URL with storage=s3"
        found.append(f"storage.mlflow_tracking_uri = {uri!r}: {expected}")
    return found


def problems(cfg: DictConfig) -> list[str]:
    """One line per setting whose value the pipeline cannot use; none when all is well."""
    found = []
    for key, (check, expected) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key.split(".")[0] not in cfg:
            continue  # a section this config does not have
        if OmegaConf.is_list(value):
            value = OmegaConf.to_container(value)
        if not check(value):
            found.append(f"{key} = {value!r}: expected {expected}")
    # copies per kind; which kinds exist is pipeline/features/augment.py's to say
    for kind, count in cfg.get("augment", {}).items():
        if not integer(0)[0](count):
            found.append(f"augment.{kind} = {count!r}: expected a whole number >= 0")
    return found + storage_problems(cfg)


def check_settings(cfg: DictConfig) -> None:
    """SettingError listing every bad setting, one per line."""
    found = problems(cfg)
    if found:
        raise SettingError("\n".join(found))
