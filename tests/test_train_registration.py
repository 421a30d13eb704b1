"""The trainer's file-level registration (train.registration): the cache and parallel workers agree."""

from __future__ import annotations

from engine.io import write_png
from engine.registration import RegistrationParams
from test_registration import _max_point_error_px, known_pair
from train.registration import register_many


def test_files_cache_and_workers_agree(tmp_path):
    fixed, moving, truth = known_pair(96)
    write_png(tmp_path / "a.png", fixed, bits=16)
    write_png(tmp_path / "b.png", moving, bits=16)
    params = RegistrationParams(size=96)
    pairs = [(tmp_path / "a.png", tmp_path / "b.png")] * 2
    first = register_many(pairs[:1], params, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    cached = register_many(pairs[:1], params, cache_dir=tmp_path / "cache")
    assert cached[0].matrix == first[0].matrix and cached[0].seconds == first[0].seconds  # read, not recomputed
    parallel = register_many(pairs, params, workers=2, write_registered=[tmp_path / "r.png", None])
    assert _max_point_error_px(parallel[0], truth, 96) < 1.5
    assert (tmp_path / "r.png").is_file()
