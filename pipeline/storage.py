"""`python -m pipeline.storage [overrides]`: make conf/'s `storage.dvc_remote` the
project's default DVC remote, so that `dvc push` and `dvc pull` use the bucket
(docs/scaling-out.md). With `storage=local` there is none
to set. The endpoint of a store other than AWS is DVC's to read: AWS_ENDPOINT_URL,
or `dvc remote modify storage endpointurl URL`."""

import subprocess
import sys

from pipeline.project.config import checked_overrides, compose_config

REMOTE = "storage"  # the DVC remote's name in .dvc/config


def main(argv: list[str] | None = None) -> int:
    from pipeline.data.images import SettingError
    from pipeline.project.settings import check_settings

    cfg = compose_config(*checked_overrides(sys.argv[1:] if argv is None else argv))
    try:
        check_settings(cfg)
    except SettingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cfg.storage.dvc_remote is None:
        print(f"storage={cfg.storage.type}: no DVC remote to set (storage.dvc_remote is null)")
        return 0
    command = ["dvc", "remote", "add", "--default", "--force", REMOTE, cfg.storage.dvc_remote]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"error: {' '.join(command)}: {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    print(f"the default DVC remote is now {REMOTE}: {cfg.storage.dvc_remote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
