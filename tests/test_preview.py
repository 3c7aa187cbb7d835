"""The QA preview page, rendered from local files: thumbnails, escaping, failures grouped by reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

from testkit.data import make_jpeg
from tests.helpers import run_manifest
from vqa_operators.preview import write_preview
from vqa_operators.storage.uris import Storage


def test_preview_shows_thumbnails_escaped_qa_and_failures_by_reason(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(make_jpeg((640, 480)))
    out = tmp_path / "run" / "generate.jsonl"
    out.parent.mkdir()
    rows = [
        {
            "image": ["a.jpg", "gone.jpg"],
            "qa_pairs": [{"question": "Is <script>alert(1)</script> shown?", "answer": "No & never."}],
        },
        {"image": "a.jpg", "qa_pairs": [{"question": "Colour?", "answer": "Red."}]},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = [
        {
            "stage": "image_qa",
            "line": 3 + i,
            "reason": "invalid_json" if i < 7 else "bad_image",
            "detail": f"d{i}",
            "raw_output": "{oops",
        }
        for i in range(8)
    ]
    (tmp_path / "run" / "generate.errors.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors))
    manifest = run_manifest(
        "image_qa", out, rows_in=10, rows_out=2, rows_failed=8, prompt_tokens=10, completion_tokens=5, requests=9
    )
    uri = write_preview(Storage(), manifest, title="image_qa · run", media_root=str(tmp_path), examples_per_reason=5)
    assert uri == str(tmp_path / "run" / "generate.preview.html")
    page = Path(uri).read_text()
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 2  # a.jpg twice; gone.jpg is named instead
    assert '<div class="missing" title="gone.jpg">image_not_found</div>' in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert re.findall(r"<h3>(.*?)</h3>", page) == ["invalid_json · 7 rows", "bad_image · 1 row"]
    assert page.count("<td><code>{oops</code></td>") == 6  # 5 examples of invalid_json, 1 of bad_image
    assert "2 more in the errors files." in page


def test_a_run_with_other_field_names_previews_from_the_generators_declared_fields(tmp_path: Path) -> None:
    """image_qa run with image_key="photos" and output_key="pairs": the page finds both, from the rows' provenance."""
    (tmp_path / "a.jpg").write_bytes(make_jpeg((64, 48)))
    out = tmp_path / "run" / "generate.jsonl"
    out.parent.mkdir()
    options = {"image_key": "photos", "output_key": "pairs", "pairs_per_row": 1}
    row = {
        "photos": ["a.jpg"],
        "pairs": [{"question": "Which colour?", "answer": "Red."}],
        "vqa_provenance": {"image_qa": {"options": options}},
    }
    out.write_text(json.dumps(row) + "\n")
    (tmp_path / "run" / "generate.errors.jsonl").write_text("")
    manifest = run_manifest("image_qa", out, rows_in=1, rows_out=1, prompt_tokens=10, completion_tokens=5, requests=1)
    page = Path(write_preview(Storage(), manifest, title="t", media_root=str(tmp_path))).read_text()
    assert "Which colour?" in page and "Red." in page
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 1
