"""Tutorial 2 — verify a suspect model black-box: from a folder of DICOM files, and over HTTP.

Uses the bundle trained in tutorial 1 (or any bundle folder with `models/model.pt`) as the "suspect":

1. `verify --bundle`: the CLI loads the bundle's network and its own preprocessing, stamps the key's trigger on
   the held-out patient's DICOM slices and reads the QR from the returned probabilities;
2. `verify --url`: the same model behind the reference server (`python -m monai_stealthmark.serve`), queried
   over loopback HTTP — only triggered images leave the verifier, never the key;
3. the report: `report.json` / `report.md` and the PNGs (`direct_summary.png`: expected QR on top, then each
   image's uncertainty map next to the QR recovered from it).

Exit codes of `verify`: 0 ownership shown, 1 not shown, 2 error.

    python tutorials/02_verify_a_suspect.py --out /tmp/tutorial
"""

from __future__ import annotations

import argparse
from pathlib import Path

from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/stealthmark_tutorial")
    p.add_argument("--dicoms", default=str(DEFAULT_SUNNYBROOK_ROOT / "dicoms" / "SCD0000501"))
    a = p.parse_args(argv)
    out = Path(a.out)
    bundle, key = out / "bundle", out / "key.json"
    if not (bundle / "models" / "model.pt").is_file():
        raise SystemExit("run tutorials/01_watermark_a_bundle.py first (it trains the bundle into --out).")
    # the bundle folder needs its configs next to the weights, as a deployed bundle has them
    import shutil

    src = Path(__file__).resolve().parents[1] / "bundles" / "sunnybrook_lv_2d" / "configs"
    shutil.copytree(src, bundle / "configs", dirs_exist_ok=True)

    from monai_stealthmark.__main__ import main as cli
    from monai_stealthmark.serve import bundle_predictor, make_server, start_in_thread

    code_dir = cli(["verify", "--key", str(key), "--images", a.dicoms, "--bundle", str(bundle), "--out", str(out / "report_bundle"), "--quiet"])
    server = make_server(bundle_predictor(str(bundle), device="cpu"))
    url = start_in_thread(server)
    try:
        code_http = cli(["verify", "--key", str(key), "--images", a.dicoms, "--url", url, "--out", str(out / "report_http"), "--quiet"])
    finally:
        server.shutdown()
        server.server_close()
    print(f"exit codes: bundle folder {code_dir}, HTTP {code_http} (0 = ownership shown, 1 = not shown)")
    print(f"summary picture: {out / 'report_http' / 'direct_summary.png'}")
    return 0 if code_dir in (0, 1) and code_http == code_dir else 2


if __name__ == "__main__":
    raise SystemExit(main())
