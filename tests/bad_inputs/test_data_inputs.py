"""Bad data files, as a user would hand them to ``lrr run``: every one fails before the
model loads, with one line naming the file, the line (Parquet: the row) and the column,
and the fix; no traceback, nothing written (lowrank_runner/tasks/data_check.py)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot

GOOD = [{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": "neg"}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def run_with(tmp_path, tiny_bert):
    """``run_with(files, task_yaml, name=, data=, args=)``: write the files (name -> text
    or bytes) into a fresh directory and a recipe of task ``name`` reading the first two
    as train and validation (or ``data``, YAML; "" for none) with ``task_yaml`` added to
    its task; run ``lrr run`` there (``args`` added) and check that it wrote nothing;
    returns the result."""

    def run(files: dict, task: str = "", name: str = "classification", data: str | None = None,
            args: tuple[str, ...] = ()):
        for fname, content in files.items():
            path = tmp_path / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        if data is None:  # the first two files (data="": no task.data)
            train, validation = (list(files) + list(files))[:2]
            data = f"{{train: {train}, validation: {validation}}}"
        (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""\
            name: bad-data
            backbone: {{name: {tiny_bert}}}
            targets: [Wq, Wv]
            method: {{name: lora, r: 2, alpha: 4}}
            task:
              name: {name}
              {"data: " + data if data else ""}
              max_length: 16
            """) + textwrap.indent(textwrap.dedent(task), "  ") + textwrap.dedent("""\
            training: {learning_rate: 1e-2, epochs: 1, batch_size: 4, seed: 0}
            """))
        before = snapshot(tmp_path)
        result = lrr("run", "recipe.yaml", "--output", "out", *args, cwd=tmp_path)
        assert snapshot(tmp_path) == before, "a failed run left files behind"
        return result

    return run


def pair(train, validation=None):
    """Files train.jsonl and dev.jsonl (dev: the good rows unless given)."""
    return {"train.jsonl": train, "dev.jsonl": validation if validation is not None else jsonl(GOOD)}


# ---------------------------------------------------------------- JSON Lines

def test_empty_jsonl(run_with):
    assert_clean_error(run_with(pair("")), "train.jsonl: empty file; expected rows of data", code=1)


def test_jsonl_of_blank_lines_only(run_with):
    assert_clean_error(run_with(pair("\n  \n\n")), "train.jsonl: empty file; expected rows of data", code=1)


def test_broken_json_line_after_blank_lines(run_with):
    text = jsonl(GOOD[:1]) + "\n\n" + '{"text": "x" "label": "neg"}\n'
    assert_clean_error(run_with(pair(text)), "train.jsonl:4:14: not valid JSON (Expecting ',' delimiter)", code=1)


def test_json_line_that_is_not_an_object(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD) + "[1, 2]\n")),
                       'train.jsonl:3: a row must be a JSON object {"column": value, ...}, got a list [1, 2]')


def test_csv_content_in_a_jsonl_file(run_with):
    assert_clean_error(run_with(pair("text,label\na,pos\n")),
                       "train.jsonl:1:1: not valid JSON (Expecting value); JSON Lines hold one object {...} per line "
                       "(a CSV file? name it .csv or set task.data.format)")


def test_non_utf8_jsonl(run_with):
    raw = jsonl(GOOD).encode() + '{"text": "café", "label": "pos"}\n'.encode("latin-1")
    assert_clean_error(run_with(pair(raw)), "train.jsonl:3:14: not UTF-8 (byte 0xe9); save the file as UTF-8")


def test_mixed_label_types(run_with):
    rows = GOOD + [{"text": "fine", "label": 1}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:3: column 'label': a number label (1), but the label on line 1 is text (\"pos\"); "
                       "write every label the same way (all class names or all class indices)")


def test_null_label(run_with):
    rows = GOOD + [{"text": "fine", "label": None}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:3: column 'label': null; every row needs a label (fill it in or remove the row)")


def test_row_without_the_label_key(run_with):
    rows = GOOD + [{"text": "fine"}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:3: column 'label': no 'label' in this row; every row needs a label "
                       "(fill it in or remove the row)")


def test_label_that_is_a_list(run_with):
    rows = GOOD + [{"text": "fine", "label": ["pos"]}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:3: column 'label': a list ([\"pos\"]) is not a label; a label is a class name "
                       "or a class index")


def test_null_text(run_with):
    rows = [GOOD[0], {"text": None, "label": "neg"}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:2: column 'text': null; every row needs its text (fill it in or remove the row)")


def test_numeric_text(run_with):
    rows = [GOOD[0], {"text": 5, "label": "neg"}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl:2: column 'text': a number (5), not text; write it as a string, or set "
                       "task.text_column to the column that holds the text")


def test_label_column_in_one_split_only(run_with):
    result = run_with(pair(jsonl(GOOD), jsonl([{"text": "a"}, {"text": "b"}])))
    assert_clean_error(result, "dev.jsonl: no column 'label' (columns: 'text'); set task.label_column to one of them")


def test_column_mapping_naming_a_missing_column(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD)), "text_column: sentence\n"),
                       "train.jsonl: no column 'sentence' (columns: 'text', 'label'); set task.text_column to one "
                       "of them")


def test_pair_column_naming_a_missing_column(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD)), "text_pair_column: hypothesis\n"),
                       "train.jsonl: no column 'hypothesis' (columns: 'text', 'label'); set task.text_pair_column "
                       "to one of them")


def test_validation_label_never_seen_in_training(run_with):
    dev = jsonl([*GOOD, {"text": "so so", "label": "neutral"}])
    assert_clean_error(run_with(pair(jsonl(GOOD), dev)),
                       "dev.jsonl:3: column 'label': 'neutral' is not a class of the training split (train.jsonl) "
                       "('neg', 'pos'); fix the row, or list every class in task.labels")


def test_training_label_missing_from_declared_labels(run_with):
    """More classes in the data than task.labels declares."""
    rows = [*GOOD, {"text": "so so", "label": "neutral"}]
    assert_clean_error(run_with(pair(jsonl(rows)), "labels: [pos, neg]\n"),
                       "train.jsonl:3: column 'label': 'neutral' is not a class of task.labels ('pos', 'neg'); "
                       "fix the row, or list every class in task.labels")


def test_single_class_training_set(run_with):
    rows = [{"text": "good", "label": "pos"}, {"text": "fine", "label": "pos"}]
    assert_clean_error(run_with(pair(jsonl(rows))),
                       "train.jsonl: every training label is 'pos'; a classifier needs at least two classes: add "
                       "examples of the others (or list every class in task.labels)")


def test_json_array_element_that_is_not_an_object(run_with):
    text = '[\n  {"text": "a", "label": "pos"},\n  {"text": "b", "label": "neg"},\n  "c"\n]\n'
    files = {"train.json": text, "dev.jsonl": jsonl(GOOD)}
    assert_clean_error(run_with(files), 'train.json:4: a row must be a JSON object {"column": value, ...}, got text "c"')


def test_delimiter_for_json_files(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD)),
                                data='{train: train.jsonl, validation: dev.jsonl, delimiter: ";"}'),
                       "task.data.delimiter applies to CSV/TSV files, and train, validation are json; remove it")


# ---------------------------------------------------------------- CSV, TSV

def csvs(train: str | bytes, dev: str = "text,label\na good film,pos\na bad film,neg\n") -> dict:
    return {"train.csv": train, "dev.csv": dev}


def test_semicolon_delimited_csv(run_with):
    assert_clean_error(run_with(csvs("text;label\na;pos\nb;neg\n")),
                       "train.csv:1: no column 'text' (columns: 'text;label'); set task.text_column to one of them, "
                       "or, if the file is ';'-separated, set task.data.delimiter: \";\"")


def test_csv_row_with_too_many_fields(run_with):
    assert_clean_error(run_with(csvs("text,label\na,pos\nb, c,neg\n")),
                       "train.csv:3: 3 fields, but the header (line 1) has 2; quote fields that hold the delimiter "
                       "(\"a, b\"), or set task.data.delimiter if the file uses another")


def test_csv_row_with_too_few_fields(run_with):
    assert_clean_error(run_with(csvs("text,label\na,pos\n\nb\n")),
                       "train.csv:4: 1 field, but the header (line 1) has 2; quote fields that hold the delimiter "
                       "(\"a, b\"), or set task.data.delimiter if the file uses another")


def test_tsv_field_holding_a_tab(run_with):
    files = {"train.tsv": "text\tlabel\na\tpos\nb\tc\tneg\n", "dev.tsv": "text\tlabel\na\tpos\nb\tneg\n"}
    assert_clean_error(run_with(files), "train.tsv:3: 3 fields, but the header (line 1) has 2; a TSV field cannot "
                                        "hold a tab (TSV files are read without quoting)")


def test_csv_header_only(run_with):
    assert_clean_error(run_with(csvs("text,label\n")), "train.csv: no rows of data (only a header)")


def test_csv_header_naming_a_column_twice(run_with):
    assert_clean_error(run_with(csvs("text,text,label\na,b,pos\n")),
                       "train.csv:1: the header names column 'text' twice; give every column its own name")


def test_non_utf8_csv(run_with):
    assert_clean_error(run_with(csvs("text,label\ncafé,pos\n".encode("cp1252"))),
                       "train.csv:2:4: not UTF-8 (byte 0xe9); save the file as UTF-8")


def test_json_content_in_a_csv_file(run_with):
    assert_clean_error(run_with(csvs(jsonl(GOOD))),
                       "train.csv:1: the file holds JSON, read as csv; rename the file to its format's extension or "
                       "set task.data.format: json")


def test_csv_empty_label_cell(run_with):
    """An empty CSV cell has no label; 'NA' is text, not a missing value."""
    assert_clean_error(run_with(csvs("text,label\nNA,pos\nb,\n")),
                       "train.csv:3: column 'label': empty; every row needs a label (fill it in or remove the row)")


# ---------------------------------------------------------------- Parquet, formats, paths

def test_corrupt_parquet(run_with):
    files = {"train.parquet": b"PAR1 not really", "dev.parquet": b"PAR1 not really"}
    assert_clean_error(run_with(files),
                       "train.parquet: not a readable Parquet file (Parquet magic bytes not found in footer. Either "
                       "the file is corrupted or this is not a parquet file.); write it again (e.g. pandas "
                       "DataFrame.to_parquet)")


def test_csv_named_parquet(run_with):
    files = {"train.parquet": "text,label\na,pos\n", "dev.parquet": "text,label\na,pos\n"}
    assert_clean_error(run_with(files), "train.parquet: not a Parquet file (it holds text); rename the file to its "
                                        "format's extension or set task.data.format")


def test_parquet_with_a_null_label(run_with, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["pos", None, "neg"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["pos", "neg"]}), tmp_path / "dev.parquet")
    assert_clean_error(run_with({}, data="{train: train.parquet, validation: dev.parquet}"),
                       "train.parquet: row 2: column 'label': null; every row needs a label (fill it in or remove "
                       "the row)")


def test_unknown_extension(run_with):
    files = {"train.txt": "a b\n", "dev.txt": "a b\n"}
    assert_clean_error(run_with(files), "train.txt: cannot tell the format from '.txt'; set task.data.format (csv, "
                                        "tsv, json, parquet)")


def test_data_path_that_is_a_pipe_does_not_hang(run_with, tmp_path):
    os.mkfifo(tmp_path / "train.jsonl")
    (tmp_path / "dev.jsonl").write_text(jsonl(GOOD))
    assert_clean_error(run_with({}, data="{train: train.jsonl, validation: dev.jsonl}"),
                       "task.data.train: train.jsonl is not a regular file (a pipe or device?); expected a data file")


def test_unreadable_data_file(run_with, tmp_path, monkeypatch):
    import lowrank_runner.tasks.data_check as data_check

    (tmp_path / "train.jsonl").write_text(jsonl(GOOD))
    (tmp_path / "train.jsonl").chmod(0)
    if os.geteuid() == 0:  # root reads every file: make the check see what another user would
        real = os.access
        monkeypatch.setattr(data_check.os, "access", lambda p, mode: not str(p).endswith("train.jsonl") and real(p, mode))
    (tmp_path / "dev.jsonl").write_text(jsonl(GOOD))
    assert_clean_error(run_with({}, data="{train: train.jsonl, validation: dev.jsonl}"),
                       "task.data.train: train.jsonl: permission denied; make the file readable")


def test_data_path_that_is_a_directory(run_with, tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    (tmp_path / "dev.jsonl").write_text(jsonl(GOOD))
    result = run_with({}, data="{train: train.jsonl, validation: dev.jsonl}")
    assert_clean_error(result, code=1, contains=("task.data.train: train.jsonl is a directory; expected a data file",))


# ---------------------------------------------------------------- regression, hold-out

def test_regression_label_that_is_not_a_number(run_with):
    rows = [{"text": "a", "label": 1.5}, {"text": "b", "label": "high"}]
    assert_clean_error(run_with(pair(jsonl(rows), jsonl(rows[:1])), name="regression"),
                       "train.jsonl:2: column 'label': \"high\" is not a number; a regression label is a number "
                       "(a score)")


def test_regression_label_nan(run_with):
    text = '{"text": "a", "label": 1.5}\n{"text": "b", "label": NaN}\n'
    assert_clean_error(run_with(pair(text), name="regression"),
                       "train.jsonl:2: column 'label': NaN is not a finite number; fix the score or remove the row")


def test_regression_label_nan_in_csv(run_with):
    assert_clean_error(run_with(csvs("text,label\na,1.5\nb,nan\n", "text,label\na,1\nb,2\n"), name="regression"),
                       "train.csv:3: column 'label': \"nan\" is not a finite number; fix the score or remove the row")


def test_constant_regression_labels(run_with):
    rows = [{"text": "a", "label": 2.0}, {"text": "b", "label": 2.0}]
    assert_clean_error(run_with(pair(jsonl(rows)), name="regression"),
                       "train.jsonl: every training score is 2; a regression needs scores that vary")


def test_holdout_leaving_no_training_examples(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD)), "holdout_fraction: 0.6\n"),
                       "task.holdout_fraction: holding out 0.6 of 2 training examples leaves none to train on; lower "
                       "holdout_fraction, or train on more examples (more rows, or a larger or no "
                       "task.max_train_samples)")


def test_pretty_printed_json_document_in_a_jsonl_file(run_with):
    text = json.dumps({"text": ["a", "b"], "label": ["pos", "neg"]}, indent=2)
    assert_clean_error(run_with(pair(text)),
                       "train.jsonl:1:2: not valid JSON (Expecting property name enclosed in double quotes); JSON "
                       "Lines hold one whole object per line (a record written over several lines? one JSON "
                       "document? write one object per line, or an array of objects [{...}, {...}])")


def test_utf16_file(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD).encode("utf-16"))),
                       "train.jsonl:1:1: not UTF-8 (byte 0xff) (it is UTF-16); save the file as UTF-8")


def test_csv_with_an_unclosed_quote(run_with):
    assert_clean_error(run_with(csvs('text,label\n"a,pos\nb,neg\n')),
                       "train.csv:2: 1 field, but the header (line 1) has 2; the quoted field from line 2 runs on to "
                       "line 3: close its quote (\")")


def test_tab_separated_file_named_csv(run_with):
    assert_clean_error(run_with(csvs("text\tlabel\na\tpos\n")),
                       "train.csv:1: no column 'text' (columns: 'text\\tlabel'); set task.text_column to one of "
                       "them, or, if the file is tab-separated, name it .tsv or set task.data.format: tsv")


def test_max_length_leaving_no_room_for_text(run_with):
    assert_clean_error(run_with(pair(jsonl(GOOD)), args=("--set", "task.max_length=2")),
                       "--set task.max_length=2: task.max_length: must be >= 8; got 2", code=1)


# ---------------------------------------------------------------- GLUE and SQuAD files

RTE = "index\tsentence1\tsentence2\tlabel\n0\tA man walks.\tA person walks.\tentailment\n"


def test_glue_directory_missing_a_file(run_with, tmp_path):
    result = run_with({"glue/RTE/train.tsv": RTE}, name="rte", data="", task="data_dir: glue\n")
    assert_clean_error(result, "glue/RTE/dev.tsv: GLUE file not found (task.data_dir should hold RTE/dev.tsv)")


def test_glue_tsv_missing_a_column(run_with):
    files = {"glue/RTE/train.tsv": RTE, "glue/RTE/dev.tsv": "index\tsentence1\tlabel\n0\tA man.\tentailment\n"}
    assert_clean_error(run_with(files, name="rte", data="", task="data_dir: glue\n"),
                       "glue/RTE/dev.tsv:1: header has no column for sentence2 (looked for sentence2; header: index, "
                       "sentence1, label)")


def test_squad_json_without_data(run_with):
    files = {"squad/train-v2.0.json": json.dumps({"version": "v2.0"}), "squad/dev-v2.0.json": "{}"}
    assert_clean_error(run_with(files, name="squad_v2", data="", task="data_dir: squad\n"),
                       'squad/train-v2.0.json: expected the SQuAD 2.0 layout {"version": ..., "data": [articles]}')


def test_validate_reads_the_head_of_each_data_file(tmp_path, tiny_bert):
    """`lrr validate` (no torch, bounded reads) already names a semicolon CSV and a missing
    column, at the recipe line of the file."""
    (tmp_path / "t.csv").write_text("sentence;label\ngood;pos\n")
    (tmp_path / "v.jsonl").write_text(jsonl([{"sentence": "x", "label": "pos"}]))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""\
        name: peek
        backbone: {{name: {tiny_bert}}}
        targets: [Wq]
        method: {{name: lora}}
        task:
          name: classification
          data: {{train: t.csv, validation: v.jsonl}}
        """))
    result = lrr("validate", "recipe.yaml", cwd=tmp_path)
    assert result.code == 1
    assert result.stdout.splitlines() == [
        "recipe.yaml:7:17: task.data.train: t.csv:1: no column 'text' (columns: 'sentence;label'); set "
        "task.text_column to one of them, or, if the file is ';'-separated, set task.data.delimiter: \";\"",
        "recipe.yaml:7:36: task.data.validation: v.jsonl: no column 'text' (columns: 'sentence', 'label'); "
        "set task.text_column to one of them",
    ]


# ---------------------------------------------------------------- duplicate keys, joined files

def test_jsonl_row_naming_a_key_twice(run_with, capfd):
    """pyarrow refuses the file ("Column(/text) was specified twice"): the checker names the line."""
    text = jsonl(GOOD) + '{"text": "a", "text": "b", "label": "pos"}\n'
    result = run_with(pair(text))
    assert_clean_error(result, 'train.jsonl:3: key "text" is written twice in one object; keep one of them (each '
                               'key names one column)')
    assert "Failed to load JSON" not in result.output + capfd.readouterr().err


def test_jsonl_nested_object_naming_a_key_twice(run_with):
    text = jsonl(GOOD) + '{"text": "a", "meta": {"x": 1, "x": 2}, "label": "pos"}\n'
    assert_clean_error(run_with(pair(text)), 'train.jsonl:3: key "x" is written twice in one object; keep one of '
                                             'them (each key names one column)')


def test_json_array_element_naming_a_key_twice(run_with):
    text = '[\n  {"text": "a", "label": "pos"},\n  {"text": "b",\n   "label": "neg", "label": "pos"}\n]\n'
    files = {"train.json": text, "dev.jsonl": jsonl(GOOD)}
    assert_clean_error(run_with(files), 'train.json:3: key "label" is written twice in one object; keep one of '
                                        'them (each key names one column)')


def test_what_datasets_still_refuses_is_one_line(tmp_path, monkeypatch, capfd):
    """A file the checker passes but ``datasets`` refuses (here: the duplicate-key check
    switched off) gives the reader's own error as one DataError line; datasets' log line
    ("Failed to load JSON ...") stays out of the output."""
    import lowrank_runner.tasks.data_check as data_check
    from lowrank_runner.errors import DataError
    from lowrank_runner.quiet import quiet_libraries
    from lowrank_runner.tasks.local_files import load_files

    quiet_libraries()
    monkeypatch.setattr(data_check, "JSON_DECODER", json.JSONDecoder())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "a", "text": "b", "label": "pos"}\n')
    with pytest.raises(DataError) as err:
        load_files({"train": "train.jsonl"}, ("train",), {"text": "task.text_column"})
    assert str(err.value) == ("train.jsonl: cannot read as json (ArrowInvalid: JSON parse error: Column(/text) was "
                              "specified twice in row 0)")
    assert "Failed to load JSON" not in capfd.readouterr().err


def test_byte_order_mark_inside_a_jsonl_file(run_with):
    """Two files joined with cat: the second one's byte order mark starts line 3."""
    raw = jsonl(GOOD).encode() + b"\xef\xbb\xbf" + jsonl(GOOD).encode()
    assert_clean_error(run_with(pair(raw)), "train.jsonl:3:1: a byte order mark (U+FEFF) inside the file (files "
                                            "joined together?); remove it")


def test_byte_order_mark_inside_a_json_line(run_with):
    raw = jsonl(GOOD).encode() + b'{ \xef\xbb\xbf"text": "c", "label": "neg"}\n'
    assert_clean_error(run_with(pair(raw)), "train.jsonl:3:3: a byte order mark (U+FEFF) inside the file (files "
                                            "joined together?); remove it")


def test_byte_order_mark_inside_a_json_array(run_with):
    raw = b'[{"text": "a", "label": "pos"},\n\xef\xbb\xbf{"text": "b", "label": "neg"}]\n'
    files = {"train.json": raw, "dev.jsonl": jsonl(GOOD)}
    assert_clean_error(run_with(files), "train.json:2:1: a byte order mark (U+FEFF) inside the file (files joined "
                                        "together?); remove it")


def test_byte_order_mark_inside_a_csv_file(run_with):
    raw = b"text,label\na,pos\n\xef\xbb\xbftext,label\nb,neg\n"
    assert_clean_error(run_with(csvs(raw)), "train.csv:3:1: a byte order mark (U+FEFF) inside the file (files "
                                            "joined together?); remove it")


def test_csv_header_repeated_as_a_row(run_with):
    """Two CSV files joined: the second header would be a row of class 'label'."""
    assert_clean_error(run_with(csvs("text,label\na,pos\ntext,label\nb,neg\n")),
                       "train.csv:3: the header (line 1) again, as a row (files joined together?); remove the line")


# ---------------------------------------------------------------- paths read literally

TRAIN = jsonl(GOOD * 3)  # 6 rows
DECOY = jsonl([{"text": "so so", "label": "neutral"}] * 4)  # what a glob reading of the path would add


def write_recipe(tmp_path: Path, tiny_bert, train: str, files: dict[str, str]) -> None:
    """``files`` (path -> text) and a recipe training on ``train`` (any characters:
    written as a quoted YAML string)."""
    for name, text in {**files, "dev.jsonl": jsonl(GOOD)}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""\
        name: literal-paths
        backbone: {{name: {tiny_bert}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 2, alpha: 4}}
        task:
          name: classification
          data:
            train: {json.dumps(train)}
            validation: dev.jsonl
          max_length: 16
        training: {{learning_rate: 1e-2, epochs: 1, batch_size: 4, seed: 0}}
        """), encoding="utf-8")


@pytest.mark.parametrize("train, decoys", [
    ("g/tr*.jsonl", ["g/tr1.jsonl"]),  # as a glob: both files
    ("g/tr?.jsonl", ["g/tra.jsonl"]),
    ("br[1]/train.jsonl", ["br1/train.jsonl"]),  # as a glob: the other directory only
    ("br[x]/train.jsonl", []),  # as a glob: no file at all
    ("x]/*/train.jsonl", ["x]/y/train.jsonl"]),
    ("sp ace/ünï {a,b}/train.jsonl", ["sp ace/ünï a/train.jsonl"]),
    ("q/**", ["q/deep/train.jsonl"]),
], ids=["star", "question-mark", "class", "brackets", "closing-bracket-and-star", "space-unicode-braces",
        "double-star"])
def test_data_path_is_read_literally(tmp_path, tiny_bert, train, decoys):
    """A data path names one file, never a pattern: the six rows of that file, whatever
    glob characters its name holds (``datasets`` would glob it: lowrank_runner/tasks/local_files.py)."""
    write_recipe(tmp_path, tiny_bert, train, {train: TRAIN, **{d: DECOY for d in decoys}})
    result = lrr("inspect", "recipe.yaml", "--json", "--set", "task.data.format=json", cwd=tmp_path)
    assert result.code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["train_examples"] == 6


def test_run_on_a_path_with_brackets(tmp_path, tiny_bert):
    """``lrr run`` trains on a file in a directory named with brackets (was: "cannot read as json (StopIteration)")."""
    write_recipe(tmp_path, tiny_bert, "br[x]/train.jsonl", {"br[x]/train.jsonl": TRAIN, "brx/train.jsonl": DECOY})
    result = lrr("run", "recipe.yaml", "--output", "out", cwd=tmp_path)
    assert result.code == 0, result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())  # trained and scored
    task = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["task"]
    assert task["id2label"] == {"0": "neg", "1": "pos"}  # the literal file's classes only


def test_data_path_holding_a_double_colon(run_with, tmp_path):
    """``::`` chains URLs in ``datasets`` and cannot be escaped: a clear error, before the model loads."""
    result = run_with({"a::b/train.jsonl": TRAIN, "dev.jsonl": jsonl(GOOD)})
    assert_clean_error(result, f"a::b/train.jsonl: datasets cannot read a file whose path holds '::' "
                               f"({tmp_path}/a::b/train.jsonl; '::' chains URLs there); rename the directory or the "
                               "file")
