"""Growing data (docs/pipeline.md): what git holds does not grow with the number
of images; the per-image files are DVC's."""

import sys
from pathlib import Path

import pytest
from conftest import fresh_clone, make_dataset, run

DATA = "data/synthetic"


def files_in_git(project: Path) -> dict[str, int]:
    """What `git add -A` would commit after a run, the user's images left out (a
    team puts those in DVC with `dvc add`): path -> bytes."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], project).stdout.split("\n")
    return {
        name: (project / name).stat().st_size
        for name in filter(None, listed)
        if not name.startswith(DATA) and (project / name).is_file()
    }


def synthetic_data(project: Path, per_label: int, size: int) -> None:
    """`per_label` small images per label in the project's data folder, and no test
    images (an empty folder, for DVC to depend on), made its data in params.yaml."""
    make_dataset(project / DATA / "train", per_label=per_label, size=size)
    (project / DATA / "test").mkdir()
    params = [f"data.train_dir={DATA}/train", f"data.test_dir={DATA}/test"]
    run([sys.executable, "-m", "pipeline.params", *params], project)


def repro_on(project: Path, per_label: int) -> dict[str, int]:
    synthetic_data(project, per_label, size=64)
    run(["dvc", "repro"], project)
    return files_in_git(project)


@pytest.mark.slow
def test_files_in_git_do_not_grow_with_the_number_of_images(tmp_path):
    small = repro_on(fresh_clone(tmp_path / "small"), per_label=67)  # 201 images
    large = repro_on(fresh_clone(tmp_path / "large"), per_label=667)  # 2,001 images
    assert set(small) == set(large)
    grown = {name: large[name] - small[name] for name in small if abs(large[name] - small[name]) > 512}
    assert sum(large.values()) - sum(small.values()) < 4096, grown
    assert (tmp_path / "large/artifacts/split.parquet").stat().st_size > 50_000  # the table is not in git


def dvc_cache_bytes(project: Path) -> int:
    return sum(f.stat().st_size for f in (project / ".dvc/cache").rglob("*") if f.is_file())


@pytest.mark.slow
def test_one_percent_more_images_adds_under_five_percent_to_the_dvc_cache(tmp_path):
    """The data's side of the cache: the split's table and the feature store, which
    a run extends by shards of the new vectors instead of writing a new copy."""
    project = fresh_clone(tmp_path / "project")
    synthetic_data(project, per_label=3334, size=32)  # 10,002 images
    run(["dvc", "repro", "extract"], project)
    before = dvc_cache_bytes(project)
    make_dataset(project / DATA / "train", per_label=34, start=3334, size=32)  # 102 more
    run(["dvc", "repro", "extract"], project)
    added = dvc_cache_bytes(project) - before
    print(f"DVC cache after 10,002 images: {before:,} bytes; 102 more images added {added:,}")
    assert added <= 0.05 * before, f"{added} bytes added to {before}"
    assert before > 10_000 * 1280 * 4  # the vectors themselves are in it
