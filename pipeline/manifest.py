"""`python -m pipeline.manifest FOLDER MANIFEST`: list a data folder in a manifest
file, or bring one up to date, reading only files that are new or changed
(docs/your-images.md). Point `data.train_dir` (or `data.test_dir`) at the manifest
to make it the data source: DVC then depends on one file, not on every image."""

import argparse
import sys
from pathlib import Path

from pipeline.project.config import compose_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description=__doc__)
    parser.add_argument("folder", help="the data folder (one subfolder per label), or an s3:// folder")
    parser.add_argument("manifest", type=Path, help="the manifest to write or update (.parquet)")
    args = parser.parse_args(argv)
    from pipeline.data.images import DataError
    from pipeline.data.manifest import SUFFIX, build_manifest, is_manifest, load_manifest, save_manifest
    from pipeline.data.storage import data_path, is_folder, is_s3

    # an s3:// folder stays a URI (docs/scaling-out.md)
    args.folder = data_path(args.folder)
    if not is_folder(args.folder):
        print(f"error: data folder not found: {args.folder}", file=sys.stderr)
        return 2
    if not is_manifest(args.manifest):
        print(f"error: a manifest's name ends in {SUFFIX}: {args.manifest}", file=sys.stderr)
        return 2
    inside = not is_s3(args.folder) and args.manifest.resolve().is_relative_to(args.folder.resolve())
    if inside:  # the data folder is only read
        print(
            f"error: the manifest would be written inside the data folder: {args.manifest}", file=sys.stderr
        )
        return 2
    previous = None
    if args.manifest.exists():
        try:
            previous = load_manifest(args.manifest)
        except DataError as error:
            print(f"warning: {error}; listing the folder afresh", file=sys.stderr)
    manifest, read = build_manifest(args.folder, compose_config().data.max_image_pixels, previous)
    save_manifest(args.manifest, manifest)
    print(
        f"{args.manifest}: {len(manifest.rows)} images, {len(manifest.skipped)} skipped; "
        f"{read} files read, {len(manifest.rows) + len(manifest.skipped) - read} unchanged"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
