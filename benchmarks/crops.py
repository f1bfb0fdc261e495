"""Crop sizes of the two crop samplers, side by side (augment.crop_sampler).

Prints, for each source size, the mean and quartiles of the crop's area fraction and the mean
aspect ratio under ``torchvision`` (RandomResizedCrop) and ``reference`` (TF's
sample_distorted_bounding_box as the reference crops). Counts, not timings: the figures do not
depend on the host.

    python benchmarks/crops.py --draws 200000
"""

from __future__ import annotations

import argparse

import numpy as np

from simclrkit.augment import CROP_SAMPLERS, SimCLRAugment


def crop_statistics(sampler: str, height: int, width: int, draws: int) -> dict[str, float]:
    params = SimCLRAugment(output_size=32, crop_sampler=sampler).sample_params(
        0, 0, np.arange(draws), 0, height, width
    )
    crop_h, crop_w = params["height"].double().numpy(), params["width"].double().numpy()
    area = crop_h * crop_w / (height * width)
    return {
        "mean_area": float(area.mean()),
        "q25_area": float(np.quantile(area, 0.25)),
        "median_area": float(np.median(area)),
        "q75_area": float(np.quantile(area, 0.75)),
        "mean_aspect": float((crop_w / crop_h).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200_000)
    args = parser.parse_args()
    print(f"{'source':>9} {'sampler':>12} {'mean area':>10} {'q25':>6} {'median':>7} "
          f"{'q75':>6} {'aspect':>7}")
    for height, width in ((32, 32), (224, 224), (375, 500)):
        for sampler in CROP_SAMPLERS:
            s = crop_statistics(sampler, height, width, args.draws)
            print(f"{height:>4}x{width:<4} {sampler:>12} {s['mean_area']:>10.3f} "
                  f"{s['q25_area']:>6.3f} {s['median_area']:>7.3f} {s['q75_area']:>6.3f} "
                  f"{s['mean_aspect']:>7.3f}")


if __name__ == "__main__":
    main()
