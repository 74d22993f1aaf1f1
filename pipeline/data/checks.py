"""Create ML's guidance on training data, as warnings (docs/your-images.md):
nothing here stops a run."""

from collections import Counter, defaultdict

from pipeline.data.images import LabelledImage

MIN_IMAGES_PER_LABEL = 10
MAX_IMBALANCE = 10
MIN_SIDE = 299


def few_images(train: list[LabelledImage]) -> list[str]:
    counts = Counter(image.label for image in train)
    return [
        f"label '{label}' has only {n} training images; Create ML advises at least {MIN_IMAGES_PER_LABEL}"
        for label, n in sorted(counts.items())
        if n < MIN_IMAGES_PER_LABEL
    ]


def imbalance(train: list[LabelledImage]) -> list[str]:
    counts = Counter(image.label for image in train)
    (most, n_most), (least, n_least) = counts.most_common()[0], counts.most_common()[-1]
    if n_most > MAX_IMBALANCE * n_least:
        return [
            f"labels are unbalanced: '{most}' has {n_most} training images, '{least}' {n_least} "
            f"(more than {MAX_IMBALANCE}x); consider train.class_weighting=true"
        ]
    return []


def small_images(images: list[LabelledImage]) -> list[str]:
    """One warning for all of them: one per image made the split's summary grow with
    the data (every size is in the split's table)."""
    small = [image for image in images if min(image.width, image.height) < MIN_SIDE]
    if not small:
        return []
    examples = ", ".join(f"{image.path} ({image.width}x{image.height})" for image in small[:3])
    return [
        f"{len(small)} images are under {MIN_SIDE} px, so detail is lost: {examples}"
        + (", ..." if len(small) > 3 else "")
    ]


def duplicates(train: list[LabelledImage], test: list[LabelledImage]) -> list[str]:
    by_content: dict[str, list[tuple[str, LabelledImage]]] = defaultdict(list)
    for split, images in (("train", train), ("test", test)):
        for image in images:
            by_content[image.sha256].append((split, image))
    warnings = []
    for copies in by_content.values():
        paths = ", ".join(image.path for _, image in copies)
        splits = {split for split, _ in copies}
        labels = {image.label for _, image in copies}
        if splits == {"train", "test"}:
            warnings.append(f"the same image is in train and test, which inflates test accuracy: {paths}")
        elif len(labels) > 1:
            warnings.append(f"the same image has different labels: {paths}")
        elif len(copies) > 1:
            warnings.append(f"the same image is in label '{copies[0][1].label}' more than once: {paths}")
    return warnings


def data_warnings(train: list[LabelledImage], test: list[LabelledImage]) -> list[str]:
    return few_images(train) + imbalance(train) + small_images(train + test) + duplicates(train, test)
