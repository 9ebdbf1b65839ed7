"""Damaged run files give one clear error, never a hang, a traceback or a silently wrong number.

Each structural damage of ``helpers/damage.py`` (what a hostile tester did to the files) must
make reading fail with a message naming the problem, ``validate`` report an error without
raising, and every CLI command exit non-zero with one ``Error:`` line. Byte flips in the layer
data are caught by the fletcher32 checksums of format 1.2.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).with_name("helpers")))
from damage import STRUCTURAL, UNAFFECTED, make_run  # noqa: E402
from helpers.cli import one_error_line  # noqa: E402

from basis_stability import open_run  # noqa: E402
from basis_stability.cli import main  # noqa: E402
from basis_stability.errors import DamagedRunError, RunFileError  # noqa: E402
from basis_stability.store.h5io import writer_flagged  # noqa: E402
from basis_stability.store.validate import validate_run  # noqa: E402

COMMANDS = {
    "inspect": ["inspect"],
    "validate": ["validate"],
    "analyze": ["analyze", "--no-plots", "--no-cache", "-o", "{out}"],
    "export": ["export", "-o", "{out}/x.safetensors"],
}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("clean") / "run.h5")


def read_everything(path: Path) -> None:
    """What any command may read: every snapshot of every layer, the tables, config, events."""
    with open_run(path) as run:
        for name in run.layer_names:
            run.layer(name)[:]
        run.snapshots()
        run.events()
        run.config  # noqa: B018


@pytest.mark.parametrize("name, damage, words", STRUCTURAL, ids=[c[0] for c in STRUCTURAL])
def test_structural_damage_is_one_clear_error_everywhere(tmp_path, clean_run, name, damage, words):
    path = tmp_path / "run.h5"
    shutil.copyfile(clean_run, path)
    damage(path)
    with pytest.raises(RunFileError) as info:
        read_everything(path)
    assert words.lower() in str(info.value).lower(), str(info.value)
    assert str(path) in str(info.value)
    report = validate_run(path)  # never raises
    assert not report.ok, [str(f) for f in report.findings]
    for command, cmd in COMMANDS.items():
        args = [a.format(out=tmp_path / command) for a in cmd]
        result = CliRunner().invoke(main, [*args[:1], str(path), *args[1:]])
        if command in UNAFFECTED.get(name, ()):
            assert result.exit_code == 0, result.output
            continue
        one_error_line(result)


def _first_chunk(path: Path, layer: str, t: int) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f["layers"][layer].id.get_chunk_info_by_coord((t, 0, 0))
        return info.byte_offset, info.size


def test_a_flipped_byte_in_layer_data_names_the_layer_and_snapshot(tmp_path, clean_run):
    path = tmp_path / "run.h5"
    shutil.copyfile(clean_run, path)
    offset, _ = _first_chunk(path, "2", 4)
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    with open_run(path) as run:
        np.testing.assert_array_equal(run.layer("0")[4], open_run(clean_run).layer("0")[4])
        with pytest.raises(DamagedRunError, match=r"layer 2 snapshot 4 cannot be read"):
            run.layer("2")[4]
    report = validate_run(path)
    assert [(f.where, f.message[:29]) for f in report.findings if f.level == "error"] == [
        ("/layers/2", "snapshot 4 cannot be read (it")
    ]
    line = one_error_line(CliRunner().invoke(main, ["analyze", str(path), "--no-plots"]))
    assert "layer 2 snapshot 4" in line


def test_a_flipped_byte_in_the_snapshot_table_is_caught(tmp_path, clean_run):
    path = tmp_path / "run.h5"
    shutil.copyfile(clean_run, path)
    with h5py.File(path, "r") as f:
        info = f["snapshots"].id.get_chunk_info_by_coord((0,))
    data = bytearray(path.read_bytes())
    data[info.byte_offset + 9] ^= 0x01  # the step of snapshot 1
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedRunError, match="snapshot table"), open_run(path) as run:
        run.steps  # noqa: B018
    one_error_line(CliRunner().invoke(main, ["inspect", str(path)]))


def test_a_damaged_metadata_block_fails_fast_instead_of_retrying_for_hours(tmp_path, clean_run):
    """With a writer's flag set (a crashed writer), HDF5's SWMR reader retried a bad checksum
    with a doubling back-off; the open is now bounded. Run in a subprocess so a hang is caught."""
    path = tmp_path / "run.h5"
    shutil.copyfile(clean_run, path)
    crash = (
        "import h5py, os, sys; f = h5py.File(sys.argv[1], 'r+', libver='latest'); "
        "f.swmr_mode = True; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", crash, str(path)], check=True)
    assert writer_flagged(path)  # as a killed SWMR writer leaves it
    code = (
        "import sys, time\n"
        "from basis_stability import open_run\n"
        "p = sys.argv[1]\n"
        "data = bytearray(open(p, 'rb').read())\n"
        "bad = 0\n"
        "for pos in range(1000, 2400, 100):\n"
        "    d = bytearray(data); d[pos] ^= 0xFF\n"
        "    open(p + '.c', 'wb').write(d)\n"
        "    try:\n"
        "        with open_run(p + '.c') as run:\n"
        "            [run.layer(n)[:] for n in run.layer_names]\n"
        "    except Exception as e:\n"
        "        bad += 1\n"
        "print('bad', bad)\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 1, "no flip hit metadata: the test proves nothing"
    assert time.monotonic() - start < 120  # reached only without a hang (the timeout raises)


def test_the_format_1_1_reference_without_checksums_still_reads_and_warns(tmp_path):
    old = Path(__file__).parents[1] / "checkpoints_spec" / "reference_v1.1.h5"
    with open_run(old) as run:
        assert run.format_version == "1.1" and run.n_snapshots == 3
        assert run.layer_names == ["fc", "conv", "attn.in_proj"]
    report = validate_run(old)
    assert report.ok
    assert any("predates checksums" in f.message for f in report.findings)
