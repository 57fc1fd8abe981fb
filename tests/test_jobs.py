"""Job file parsing: every rejection, separators inside prompts, encodings, names."""

from __future__ import annotations

import pytest

from mgutil.errors import JobFileError
from mgutil.jobs import GenerationSettings, hash_job, parse_job_text, read_job_file, slugify_prompt

MODEL = "facebook/musicgen-small"
SETTINGS = GenerationSettings()


def parse(text: str, **kwargs):
    return parse_job_text(text, model_id=MODEL, settings=SETTINGS, **kwargs)


def test_three_fields_parse():
    result = parse("calm piano with soft strings ; 30 ; calm-piano\n")
    assert result.errors == []
    (job,) = result.jobs
    assert job.prompt == "calm piano with soft strings"
    assert job.duration_s == 30.0
    assert job.file_stem == "calm-piano"
    assert job.line_number == 1
    assert job.output_name == f"calm-piano-{job.job_hash}.wav"


def test_output_name_has_eight_hex_digits():
    (job,) = parse("beat ; 10 ; beat").jobs
    stem, digits = job.output_name.removesuffix(".wav").rsplit("-", 1)
    assert stem == "beat"
    assert len(digits) == 8
    assert int(digits, 16) >= 0


def test_comments_and_blank_lines_skipped():
    text = "# a comment\n\n   \n  # indented comment\nbeat ; 10 ; beat\n"
    result = parse(text)
    assert result.errors == []
    assert [job.line_number for job in result.jobs] == [5]


@pytest.mark.parametrize(
    ("line", "prompt", "duration", "stem"),
    [
        ("jazz; smoky bar; late night ; 40 ; jazz", "jazz; smoky bar; late night", 40.0, "jazz"),
        (
            "calm piano; soft strings ; 45",
            "calm piano; soft strings",
            45.0,
            "calm-piano-soft-strings",
        ),
        ("rock anthem ; 20", "rock anthem", 20.0, "rock-anthem"),
        ("rock anthem ; 20 ;", "rock anthem", 20.0, "rock-anthem"),
        ("ambient ; 12.5 ; amb.wav", "ambient", 12.5, "amb"),
        ("ambient ; 1e1 ; amb", "ambient", 10.0, "amb"),
    ],
)
def test_fields_split_on_last_separators(line, prompt, duration, stem):
    result = parse(line)
    assert result.errors == []
    (job,) = result.jobs
    assert job.prompt == prompt
    assert job.duration_s == duration
    assert job.file_stem == stem


@pytest.mark.parametrize(
    ("line", "reason_part", "fix_part"),
    [
        ("just a prompt without fields", "missing fields", "add the duration"),
        (" ; 30 ; name", "prompt is empty", "write a text prompt"),
        ("beat ;  ; name", "duration is missing", "duration in seconds"),
        ("beat ; thirty ; name", "not a number", "as a number"),
        ("beat ; 0 ; name", "not a positive number", "greater than 0"),
        ("beat ; -5 ; name", "not a positive number", "greater than 0"),
        ("beat ; nan ; name", "not a number", "as a number"),
        ("beat ; inf ; name", "not a number", "as a number"),
        ("beat ; 601 ; name", "over the maximum of 600 s", "MUSICGEN_MAX_DURATION_S"),
        ("beat ; 30 ; songs/beat", "path separator", "plain name"),
        ("beat ; 30 ; songs\\beat", "path separator", "plain name"),
        ("beat ; 30 ; ..beat", "'..'", "remove the '..'"),
        ("beat ; 30 ; my beat", "unsafe in S3 keys", "replace spaces"),
        ("beat ; 30 ; beat?x", "unsafe in S3 keys", "letters, digits"),
        ("beat ; 30 ; beat.mp3", "other than .wav", "'beat.wav'"),
        ("beat ; 30 ; -beat", "unsafe in S3 keys", "starting with a letter or digit"),
        ("beat ; 30 ; " + "a" * 101, "longer than 100", "shorten"),
    ],
)
def test_invalid_line_rejected(line, reason_part, fix_part):
    result = parse(f"# header\n{line}\n")
    assert result.jobs == []
    (error,) = result.errors
    assert error.line_number == 2
    assert error.text == line.strip()
    assert reason_part in error.reason
    assert fix_part in error.fix
    assert "line 2" in str(error)


def test_max_duration_configurable():
    assert parse("beat ; 700 ; beat", max_duration_s=900).errors == []
    assert parse("beat ; 700 ; beat", max_duration_s=600).errors != []


def test_duplicate_output_rejected_with_first_line():
    text = "beat ; 10 ; beat\nother ; 10 ; other\nbeat ; 10 ; beat\n"
    result = parse(text)
    assert [job.line_number for job in result.jobs] == [1, 2]
    (error,) = result.errors
    assert error.line_number == 3
    assert "line 1" in error.reason


def test_same_name_different_prompt_allowed():
    result = parse("beat one ; 10 ; beat\nbeat two ; 10 ; beat\n")
    assert result.errors == []
    assert len({job.output_name for job in result.jobs}) == 2


def test_every_bad_line_reported_at_once(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("good ; 5 ; good\nbad\nworse ; -1\nfine ; 3\n ; 4\n", encoding="utf-8")
    result = read_job_file(path, model_id=MODEL, settings=SETTINGS)
    assert [error.line_number for error in result.errors] == [2, 3, 5]
    assert len(result.jobs) == 2
    with pytest.raises(JobFileError) as raised:
        result.raise_for_errors()
    message = str(raised.value)
    assert "3 invalid line(s)" in message
    for number in (2, 3, 5):
        assert f"line {number}:" in message


def test_bom_and_crlf_accepted(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# jobs\r\nbeat ; 10 ; beat\r\nsecond ; 5\r\n".encode())
    result = read_job_file(path, model_id=MODEL, settings=SETTINGS)
    assert result.errors == []
    assert [job.prompt for job in result.jobs] == ["beat", "second"]
    assert [job.line_number for job in result.jobs] == [2, 3]
    assert result.jobs[1].file_stem == "second"


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"beat ; 10 ; beat\ncaf\xe9 ; 10\n")
    with pytest.raises(JobFileError, match=r"line 2: not valid UTF-8"):
        read_job_file(path, model_id=MODEL, settings=SETTINGS)


def test_missing_file_names_fix(tmp_path):
    with pytest.raises(JobFileError, match="prompts_path"):
        read_job_file(tmp_path / "absent.txt", model_id=MODEL, settings=SETTINGS)


def test_hash_changes_with_every_input():
    base = hash_job("beat", 10.0, MODEL, SETTINGS)
    assert hash_job("beat", 10.0, MODEL, SETTINGS) == base
    assert hash_job("beat!", 10.0, MODEL, SETTINGS)[0] != base[0]
    assert hash_job("beat", 11.0, MODEL, SETTINGS)[0] != base[0]
    assert hash_job("beat", 10.0, "facebook/musicgen-medium", SETTINGS)[0] != base[0]
    assert hash_job("beat", 10.0, MODEL, GenerationSettings(guidance_scale=4.0))[0] != base[0]
    assert hash_job("beat", 10.0, MODEL, GenerationSettings(context_s=5.0))[0] != base[0]


def test_name_stable_across_parses():
    first = parse("beat ; 10 ; beat").jobs[0]
    second = parse("# moved down\n\nbeat ; 10 ; beat").jobs[0]
    assert first.output_name == second.output_name
    assert first.seed == second.seed


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("Lo-Fi Hip Hop, warm & dusty!", "lo-fi-hip-hop-warm-dusty"),
        ("Café del Mar chillout", "cafe-del-mar-chillout"),
        ("日本の音楽", "song"),
        ("a " * 50, "a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a"),
    ],
)
def test_slug_from_prompt(prompt, slug):
    assert slugify_prompt(prompt) == slug


@pytest.mark.parametrize(
    "kwargs",
    [
        {"context_s": 30.0},
        {"context_s": -1.0},
        {"window_s": 0.0},
        {"top_k": 0},
        {"guidance_scale": float("nan")},
    ],
)
def test_generation_settings_validated(kwargs):
    with pytest.raises(ValueError):
        GenerationSettings(**kwargs)


def test_shipped_prompts_file_valid():
    from mgutil.config import PROJECT_ROOT

    result = read_job_file(PROJECT_ROOT / "prompts.txt", model_id=MODEL, settings=SETTINGS)
    assert result.errors == []
    assert len(result.jobs) >= 4
    for job in result.jobs:
        assert 30 <= job.duration_s <= 90
