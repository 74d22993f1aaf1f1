"""Stage `extract`: backbone features for every image in the split, and for the
augmented copies of the training images (docs/pipeline.md); the work is in
pipeline/features/extraction.py."""

import logging

from omegaconf import DictConfig

from pipeline.data.split_file import load_split
from pipeline.features.extraction import build_table
from pipeline.features.table import save_table
from pipeline.project.config import stage_entry

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    table = build_table(cfg, load_split(cfg.paths.split, cfg.paths.split_table))
    save_table(cfg.paths.features, table)
    log.info(
        "%d feature vectors of dimension %d (%s), %d of them augmented copies",
        *table["features"].shape,
        cfg.extractor.name,
        int((table["copy"] != "").sum()),
    )


main = stage_entry(run, "extract")

if __name__ == "__main__":
    main()
