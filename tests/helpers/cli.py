"""Running ``bstab`` in-process in tests, and what a clean failure looks like."""

from __future__ import annotations

from click.testing import CliRunner

from basis_stability.cli import main


def bstab(*args: object):
    """``bstab ARGS...`` through click's CliRunner (stdout and stderr together)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, *fragments: str) -> str:
    """Assert a non-zero exit with a handled message holding every fragment; returns the text
    with click's line wrapping undone."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "Unexpected" not in result.output, result.output
    text = " ".join(result.output.split())  # undo click's line wrapping
    for fragment in fragments:
        assert fragment in text, result.output
    return text


def one_error_line(result) -> str:
    """A clean failure that printed exactly one ``Error:`` line (after any progress bar)."""
    assert_clean_failure(result)
    lines = result.output.splitlines()
    errors = [line[line.index("Error:") :] for line in lines if "Error:" in line]
    assert len(errors) == 1, result.output
    return errors[0]
