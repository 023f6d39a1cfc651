"""`gap import`: Monet-format, messages and column data into GAP rows; images from folders and zip archives."""

import io
import json
import zipfile

import datasets
import pytest

from gap_pipeline.cli import main
from gap_pipeline.data import LATENT_PLACEHOLDER, from_dataset
from gap_pipeline.importer import MONET_MARKER, REPORT_NAME

SOURCE = "monet_Visual_CoT"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def monet_record(sample_id, query, helpers=(), answer="\\boxed{3}", dataset=SOURCE, system="Think, then answer."):
    """A Monet SFT record: question image then text; each helper a (text ending with the marker, image path,
    observation or None) triple; the answer text last."""
    reply = []
    for text, image, observation in helpers:
        reply += [{"type": "text", "text": text}, {"type": "image", "image": image}]
        if observation is not None:
            reply.append({"type": "text", "text": f"<observation>{observation}</observation> "})
    reply.append({"type": "text", "text": f"So the count is {answer}."})
    data = [{"role": "user", "content": [{"type": "image", "image": query},
                                         {"type": "text", "text": f"How many red cells? ({sample_id})"}]},
            {"role": "assistant", "content": reply}]
    if system is not None:
        data.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return {"metadata": {"sample_id": sample_id, "dataset_name": dataset}, "data": data}


@pytest.fixture
def monet_root(tmp_path, tiny_image):
    """A Monet-like data root: ``Visual_CoT/images.zip`` (entries under ``images/``) and the PNG bytes by path."""
    root = tmp_path / "Monet-SFT"
    (root / "Visual_CoT").mkdir(parents=True)
    files = {f"Visual_CoT/images/{name}.png": png(tiny_image(seed=seed))
             for seed, name in enumerate(["q0", "q1", "q2", "h0", "h1", "h2"])}
    with zipfile.ZipFile(root / "Visual_CoT" / "images.zip", "w") as archive:
        for path, data in files.items():
            archive.writestr(path.removeprefix("Visual_CoT/"), data)
    return root, files


def write_json(path, records, lines=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records))
    return path


def gap_import(*argv):
    return main(["import", "--no-progress", *map(str, argv)])


def report_of(folder):
    return json.loads((folder / REPORT_NAME).read_text())


def test_monet_rows_become_gap_rows_with_latents_parsers_aux_images_answers_ids_and_sources(monet_root, tmp_path):
    root, files = monet_root
    records = [
        monet_record(0, "Visual_CoT/images/q0.png", [("Look at the left.<abs_vis_token></abs_vis_token>",
                                                      "Visual_CoT/images/h0.png", "three red cells"),
                                                     ("Check the right." + MONET_MARKER, "Visual_CoT/images/h1.png",
                                                      "no red cells")]),
        monet_record(1, "Visual_CoT/images/q1.png", answer="<observation>by eye</observation> \\boxed{5}"),
        monet_record(2, "Visual_CoT/images/q2.png", [("Zoom." + MONET_MARKER, "Visual_CoT/images/h2.png", None)]),
    ]
    source = write_json(root / "Visual_CoT" / "train.jsonl", records, lines=True)
    out = tmp_path / "imported"
    assert gap_import("--format", "monet", "--input", source, "--image-root", root, "--output-dir", out) == 0

    rows = datasets.load_from_disk(str(out))
    assert rows["id"] == [f"{SOURCE}-0", f"{SOURCE}-1", f"{SOURCE}-2"]
    assert rows["data_source"] == [SOURCE] * 3
    assert rows["answer"] == ["3", "5", "3"]
    row = rows.cast_column("images", datasets.List(datasets.Image(decode=False))).cast_column(
        "aux_images", datasets.List(datasets.Image(decode=False)))[0]
    assert [image["bytes"] for image in row["images"]] == [files["Visual_CoT/images/q0.png"]]
    assert [image["bytes"] for image in row["aux_images"]] == [files["Visual_CoT/images/h0.png"],
                                                               files["Visual_CoT/images/h1.png"]]
    system, user, assistant = row["messages"]
    assert system["content"][0]["text"] == "Think, then answer."
    assert [item["type"] for item in user["content"]] == ["image", "text"]
    text = assistant["content"][0]["text"]
    assert text.startswith("Look at the left. <latent> <parser>three red cells</parser> Check the right. <latent> "
                           "<parser>no red cells</parser>")
    assert "abs_vis_token" not in text and "observation" not in text
    # an observation with no helper image before it keeps its text and loses its tags (Monet's rule)
    assert rows[1]["messages"][2]["content"][0]["text"] == "So the count is by eye \\boxed{5}."
    from_dataset(rows, source=str(out))  # the project's validator accepts every row, images opened

    report = report_of(out)
    assert (report["rows_in"], report["rows_out"], report["rows_with_latents"], report["latent_spans"]) == (3, 3, 2, 3)
    assert report["dropped"] == {} and report["dropped_rows"] == []
    assert report["spans_without_parser"] == 1  # row 2's helper has no observation: gap filter's missing_parser
    assert report["per_source"] == {SOURCE: {"rows_in": 3, "rows_out": 3, "rows_with_latents": 2, "dropped": {}}}


def test_a_zip_given_as_image_root_is_read_in_place_with_paths_relative_to_it(tmp_path, tiny_image):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:  # every entry under the archive's own folder, as `zip -r images.zip images`
        z.writestr("images/q.png", png(tiny_image(seed=1)))
        z.writestr("images/sub/h.png", png(tiny_image(seed=2)))
    records = [monet_record(7, "q.png", [("See." + MONET_MARKER, "sub/h.png", "x")]),  # relative to the folder
               monet_record(8, "images/q.png"),  # or to the archive's top level
               monet_record(9, "../q.png")]
    source = write_json(tmp_path / "train.json", records)
    out = tmp_path / "out"
    assert gap_import("--format", "monet", "--input", source, "--image-root", archive, "--output-dir", out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.zip", "out", "train.json"]  # nothing extracted
    rows = datasets.load_from_disk(str(out))
    assert rows["id"] == [f"{SOURCE}-7", f"{SOURCE}-8"]
    assert len(rows[0]["aux_images"]) == 1 and rows[0]["aux_images"][0].size == tiny_image(seed=2).size
    assert [e["reason"] for e in report_of(out)["dropped_rows"]] == ["path_outside_root"]


def test_each_broken_monet_row_is_dropped_and_named_with_its_reason(monet_root, tmp_path, capsys):
    root, _ = monet_root
    (root / "Visual_CoT" / "bad.png").write_bytes(b"not an image")  # a file in the folder, beside the zip
    (tmp_path / "secret.png").write_bytes(b"x")
    marker_without_image = monet_record(1, "Visual_CoT/images/q1.png")
    marker_without_image["data"][2]["content"].insert(0, {"type": "text", "text": "Zoom." + MONET_MARKER})
    image_without_marker = monet_record(2, "Visual_CoT/images/q2.png", [("Zoom.", "Visual_CoT/images/h0.png", "a")])
    records = [
        monet_record(0, "Visual_CoT/images/q0.png", [("Zoom." + MONET_MARKER, "Visual_CoT/images/h0.png", "a")]),
        marker_without_image,
        image_without_marker,
        monet_record(3, "Visual_CoT/images/q0.png", [("Zoom." + MONET_MARKER, "Visual_CoT/images/gone.png", "a")]),
        monet_record(4, "../secret.png"),
        monet_record(5, "Visual_CoT/images/q0.png", answer="nothing boxed"),
        monet_record(6, "Visual_CoT/bad.png"),
        monet_record(0, "Visual_CoT/images/q0.png"),  # the id of the first row again
    ]
    source = write_json(root / "train.json", records)
    out = tmp_path / "out"
    assert gap_import("--format", "monet", "--input", source, "--output-dir", out) == 0  # image root: the file's folder

    report = report_of(out)
    expected = {1: "marker_without_image", 2: "image_without_marker", 3: "missing_image", 4: "path_outside_root",
                5: "no_answer", 6: "unreadable_image", 7: "duplicate_id"}
    assert {entry["index"]: entry["reason"] for entry in report["dropped_rows"]} == expected
    assert report["dropped"] == {reason: 1 for reason in expected.values()}
    assert (report["rows_in"], report["rows_out"]) == (8, 1)
    assert report["per_source"][SOURCE]["dropped"] == dict(sorted({r: 1 for r in expected.values()}.items()))
    by_index = {entry["index"]: entry for entry in report["dropped_rows"]}
    assert "gone.png" in by_index[3]["detail"] and "images.zip" in by_index[3]["detail"]
    assert by_index[2]["id"] == f"{SOURCE}-2" and by_index[2]["input"] == str(source)
    printed = capsys.readouterr().out
    assert "8 rows in, 1 out" in printed and "path_outside_root 1" in printed and REPORT_NAME in printed
    assert datasets.load_from_disk(str(out))["id"] == [f"{SOURCE}-0"]


def test_strict_turns_the_first_drop_into_one_error_and_writes_nothing(monet_root, tmp_path, capsys):
    root, _ = monet_root
    records = [monet_record(0, "Visual_CoT/images/q0.png"), monet_record(1, "Visual_CoT/images/q1.png", answer="none")]
    source = write_json(root / "train.json", records)
    out = tmp_path / "out"
    assert gap_import("--format", "monet", "--input", source, "--output-dir", out, "--strict") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    assert f"row 1 (id='{SOURCE}-1'): no_answer" in error and "--strict" in error
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["Monet-SFT"]  # no output, no leftovers


def test_a_marker_in_the_system_prompt_is_named_and_drop_system_leaves_the_prompt_out(monet_root, tmp_path, capsys):
    root, _ = monet_root
    record = monet_record(0, "Visual_CoT/images/q0.png", [("Zoom." + MONET_MARKER, "Visual_CoT/images/h0.png", "a")],
                          system=f"Write {MONET_MARKER} where you imagine.")
    source = write_json(root / "train.json", [record])
    assert gap_import("--format", "monet", "--input", source, "--output-dir", tmp_path / "a") == 2
    error = capsys.readouterr().err
    assert "no row could be imported" in error and "marker_outside_assistant" in error and "--drop-system" in error
    assert gap_import("--format", "monet", "--input", source, "--output-dir", tmp_path / "b", "--drop-system") == 0
    assert [m["role"] for m in datasets.load_from_disk(str(tmp_path / "b"))[0]["messages"]] == ["user", "assistant"]


def test_messages_rows_from_parquet_with_an_aux_column_and_the_papers_marker(tmp_path, tiny_image):
    images = tmp_path / "imgs"
    images.mkdir()
    for name, seed in (("q.png", 1), ("aux1.png", 2), ("aux2.png", 3)):
        tiny_image(seed=seed).save(images / name)
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    reply = f"<think>First {pad}<parser>a grid</parser> then{pad} <parser>a row</parser></think><answer>B</answer>"
    rows = [{"messages": json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                                     {"role": "assistant", "content": reply}]),
             "images": ["q.png"], "aux_images": ["aux1.png", "aux2.png"], "data_source": "chart", "id": "c-1"}]
    source = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    out = tmp_path / "out"
    assert gap_import("--format", "messages", "--input", source, "--image-root", images, "--latent-marker", pad,
                      "--output-dir", out) == 0
    row = datasets.load_from_disk(str(out))[0]
    assert (row["id"], row["data_source"], row["answer"]) == ("c-1", "chart", "B")
    assert row["messages"][1]["content"][0]["text"] == ("<think>First <latent> <parser>a grid</parser> then <latent> "
                                                        "<parser>a row</parser></think><answer>B</answer>")
    assert [image.size for image in row["aux_images"]] == [(112, 112)] * 2
    assert report_of(out)["rows_with_latents"] == 1


def test_messages_rows_with_inline_query_and_helper_images(tmp_path, tiny_image):
    tiny_image(seed=1).save(tmp_path / "q.png")
    tiny_image(seed=2).save(tmp_path / "h.png")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "q.png"}},
                                             {"type": "text", "text": "Which row?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Look.<latent>"},
                                                  {"type": "image", "image": "h.png"},
                                                  {"type": "text", "text": "<parser>row 2</parser><answer>2</answer>"}]}]
    source = write_json(tmp_path / "rows.jsonl", [{"messages": messages, "id": "m1"}], lines=True)
    out = tmp_path / "out"
    assert gap_import("--format", "messages", "--input", source, "--output-dir", out) == 0
    row = datasets.load_from_disk(str(out))[0]
    assert row["messages"][1]["content"][0]["text"] == "Look. <latent> <parser>row 2</parser><answer>2</answer>"
    assert (row["id"], row["data_source"], row["answer"], len(row["images"]), len(row["aux_images"])) == (
        "m1", "rows", "2", 1, 1)


def test_columns_layout_is_read_from_the_files_and_an_unknown_one_lists_its_columns_and_the_flags(
        tmp_path, tiny_image, capsys):
    rows = [{"prompt": "How many?", "teacher": f"Count. {LATENT_PLACEHOLDER} <parser>four</parser> \\boxed{{4}}",
             "query": {"bytes": png(tiny_image(seed=1)), "path": None},
             "helper": [{"bytes": png(tiny_image(seed=2)), "path": None}], "origin": "GEOQA"}]
    features = datasets.Features({"prompt": datasets.Value("string"), "teacher": datasets.Value("string"),
                                  "query": datasets.Image(), "helper": datasets.List(datasets.Image()),
                                  "origin": datasets.Value("string")})
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    out = tmp_path / "out"
    capsys.readouterr()

    assert gap_import("--format", "columns", "--input", folder, "--output-dir", out) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "['prompt', 'teacher', 'query', 'helper', 'origin']" in error
    for flag in ("--question-column", "--response-column", "--image-column", "--aux-column", "--latent-marker"):
        assert flag in error
    assert not out.exists()

    assert gap_import("--format", "columns", "--input", folder, "--output-dir", out, "--question-column", "prompt",
                      "--response-column", "teacher", "--image-column", "query", "--aux-column", "helper",
                      "--source-column", "origin", "--answer-column", "nope") == 2
    assert "--answer-column 'nope' not among its columns" in capsys.readouterr().err

    assert gap_import("--format", "columns", "--input", folder, "--output-dir", out, "--question-column", "prompt",
                      "--response-column", "teacher", "--image-column", "query", "--aux-column", "helper",
                      "--source-column", "origin") == 0
    row = datasets.load_from_disk(str(out))[0]
    assert (row["id"], row["data_source"], row["answer"]) == ("saved-0", "GEOQA", "4")
    assert row["messages"][0]["content"][1]["text"] == "How many?" and len(row["aux_images"]) == 1


def test_an_output_folder_is_replaced_only_with_overwrite_and_whole(monet_root, tmp_path, capsys):
    root, _ = monet_root
    source = write_json(root / "train.json", [monet_record(0, "Visual_CoT/images/q0.png")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert gap_import("--format", "monet", "--input", source, "--output-dir", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "old.txt").exists()
    bad = write_json(root / "bad.json", [monet_record(0, "Visual_CoT/images/none.png")])
    assert gap_import("--format", "monet", "--input", bad, "--output-dir", out, "--overwrite") == 2
    assert (out / "old.txt").exists()  # a failed import leaves the old output whole
    assert gap_import("--format", "monet", "--input", source, "--output-dir", out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / REPORT_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Monet-SFT", "out"]  # no staging or cache left


def test_imported_monet_rows_go_through_gap_targets(monet_root, tmp_path, tiny_base_dir):
    root, _ = monet_root
    records = [monet_record(0, "Visual_CoT/images/q0.png", [("A." + MONET_MARKER, "Visual_CoT/images/h0.png", "x"),
                                                            ("B." + MONET_MARKER, "Visual_CoT/images/h1.png", "y")]),
               monet_record(1, "Visual_CoT/images/q1.png"),
               monet_record(2, "Visual_CoT/images/q2.png", [("C." + MONET_MARKER, "Visual_CoT/images/h2.png", "z")])]
    source = write_json(root / "Visual_CoT" / "train.json", records)
    data = tmp_path / "imported"
    assert gap_import("--format", "monet", "--input", source, "--image-root", root, "--output-dir", data,
                      "--rows-per-shard", "2") == 0  # two shards, joined in input order
    targets = tmp_path / "targets"
    assert main(["targets", "--data", str(data), "--model", str(tiny_base_dir), "--output-dir", str(targets),
                 "--latent-tokens-per-span", "4", "--device", "cpu", "--no-progress"]) == 0
    result = datasets.load_from_disk(str(targets)).with_format("numpy")
    assert [len(v) for v in result["latent_targets"]] == [2 * 4, 0, 1 * 4]
    assert list(result["id"]) == [f"{SOURCE}-0", f"{SOURCE}-1", f"{SOURCE}-2"]


def test_flags_of_another_format_and_a_bad_image_root_are_refused_before_anything_is_read(tmp_path, capsys):
    source = write_json(tmp_path / "train.json", [monet_record(0, "q.png")])
    out = tmp_path / "out"
    assert gap_import("--format", "monet", "--input", source, "--output-dir", out, "--question-column", "q") == 2
    assert "--question-column map columns of --format messages / columns" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an archive")
    for root, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "notes.txt", "not a zip archive")):
        assert gap_import("--format", "monet", "--input", source, "--output-dir", out, "--image-root", root) == 2
        assert f"--image-root {root}" in (error := capsys.readouterr().err) and message in error
    assert not out.exists()
