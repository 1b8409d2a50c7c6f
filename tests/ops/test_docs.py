"""The README's reference tables are generated from the code; they must match it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_job_spec_table_matches_the_settings_tree():
    table = subprocess.run([sys.executable, "docs/gen_spec_doc.py"], cwd=REPO, check=True, timeout=60,
                           capture_output=True, text=True).stdout
    readme = (REPO / "README.md").read_text()
    assert table in readme, "README job-spec table is stale: run `python docs/gen_spec_doc.py` and paste it"


def test_readme_names_the_two_setup_commands_and_ci_calls_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
