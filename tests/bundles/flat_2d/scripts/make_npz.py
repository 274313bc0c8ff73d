"""Build the flat_2d test bundle's data: Sunnybrook slices (data/sunnybrook) at 64x64 as two .npz files.

Run from the repository root: ``python tests/bundles/flat_2d/scripts/make_npz.py``. Writes
``tests/bundles/flat_2d/data/sunnybrook64_{train,val}.npz`` with the arrays ``images`` (N, 64, 64) float16 in
[0, 1] and ``segs`` (N, 64, 64) uint8 (0 background, 1 LV cavity, 2 myocardium where an epicardial contour
exists), the array names of model-zoo's ventricular_short_axis_3label data file. Split by patient: SCD0000501
is the validation patient. Sunnybrook Cardiac Data, CC0 1.0.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from monai_stealthmark.data import load_sunnybrook, split_by_patient

VAL_PATIENT = "SCD0000501"


def main(out_dir: str = os.path.join(os.path.dirname(__file__), "..", "data")) -> None:
    samples = load_sunnybrook(size=64, myocardium=True)
    train, val = split_by_patient(samples, [VAL_PATIENT])
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        images = np.stack([s["image"][0].numpy() for s in part]).astype(np.float16)
        segs = np.stack([s["label"][0].numpy() for s in part]).astype(np.uint8)
        path = os.path.join(out_dir, f"sunnybrook64_{name}.npz")
        np.savez_compressed(path, images=images, segs=segs)
        print(path, images.shape, np.unique(segs).tolist(), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
