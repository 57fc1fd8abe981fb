"""Job file parsing and deterministic output names.

A job file has one song per line, ``PROMPT ; DURATION_SECONDS ; FILE_NAME``. Lines whose
first non-blank character is ``#`` and blank lines are skipped. The prompt may contain
``;`` itself, so a line is split on its last two separators. ``FILE_NAME`` may be left
out, and a name is then made from the prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mgutil.errors import JobFileError

DEFAULT_WINDOW_S = 30.0
DEFAULT_CONTEXT_S = 10.0
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_TOP_K = 250

MAX_FILE_STEM_LENGTH = 100
# Characters that S3 documents as safe in object keys, minus "!*'()" which break shell
# globbing and URLs, so a name works unquoted in a terminal, a URL and a key.
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class GenerationSettings:
    """Settings that change a song's audio, and so take part in its output name.

    Attributes:
        window_s: Length of one generation window in seconds; MusicGen was trained on 30 s.
        context_s: Seconds of the song so far given as the audio prompt of each
            continuation window, so each continuation adds ``window_s - context_s``.
        guidance_scale: Classifier-free guidance scale.
        top_k: Top-k sampling cut-off.
        temperature: Sampling temperature.
    """

    window_s: float = DEFAULT_WINDOW_S
    context_s: float = DEFAULT_CONTEXT_S
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("window_s", "guidance_scale", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is invalid: expected a positive number")
        if not (math.isfinite(self.context_s) and 0 <= self.context_s < self.window_s):
            raise ValueError(
                f"context_s={self.context_s!r} is invalid: the context must be at least 0 s and "
                f"shorter than the window ({self.window_s} s), for example context_s=10 with window_s=30"
            )
        if not (isinstance(self.top_k, int) and self.top_k > 0):
            raise ValueError(f"top_k={self.top_k!r} is invalid: expected a positive whole number")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobLineError:
    """One invalid line of a job file."""

    line_number: int
    text: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.reason} in {self.text!r}. Fix: {self.fix}"


@dataclass(frozen=True)
class Job:
    """One song to generate.

    Attributes:
        line_number: 1-based line of the job file.
        prompt: Text prompt.
        duration_s: Requested duration in seconds.
        file_stem: Stem of the output name, from ``FILE_NAME`` or made from the prompt.
        job_hash: 8 hex digits from the prompt, duration, model id and settings.
        seed: Random seed derived from the same hash, so a rerun gives the same song.
    """

    line_number: int
    prompt: str
    duration_s: float
    file_stem: str
    job_hash: str
    seed: int

    @property
    def output_name(self) -> str:
        return f"{self.file_stem}-{self.job_hash}.wav"

    @property
    def record_name(self) -> str:
        return f"{self.file_stem}-{self.job_hash}.json"


@dataclass
class JobFile:
    """The result of parsing a job file: the valid jobs and every invalid line."""

    path: str
    jobs: list[Job] = field(default_factory=list)
    errors: list[JobLineError] = field(default_factory=list)

    @property
    def total_duration_s(self) -> float:
        return sum(job.duration_s for job in self.jobs)

    def raise_for_errors(self) -> None:
        """Raise :class:`JobFileError` listing every invalid line, if there are any."""
        if self.errors:
            raise JobFileError(self.path, self.errors)


def hash_job(
    prompt: str, duration_s: float, model_id: str, settings: GenerationSettings
) -> tuple[str, int]:
    """Return the 8-hex-digit job hash and the seed derived from the same digest."""
    payload = json.dumps(
        {
            "prompt": prompt,
            "duration_s": duration_s,
            "model_id": model_id,
            "settings": settings.to_dict(),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    # The seed uses other digits than the name, and fits numpy's 32-bit seeds too.
    return digest[:8], int(digest[8:16], 16)


def slugify_prompt(prompt: str, max_length: int = 40) -> str:
    """Make a file stem from a prompt: ASCII words joined by hyphens, or ``song``."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            break
        slug = candidate
    if not slug and words:
        slug = words[0][:max_length]
    return slug or "song"


def _check_file_name(name: str) -> tuple[str | None, tuple[str, str] | None]:
    """Return ``(stem, None)`` for a valid FILE_NAME, or ``(None, (reason, fix))``."""
    if "/" in name or "\\" in name:
        return None, (
            f"FILE_NAME {name!r} contains a path separator",
            "give a plain name such as 'my-song'; every song goes into the output location",
        )
    if ".." in name:
        return None, (f"FILE_NAME {name!r} contains '..'", "remove the '..' from the name")
    stem = name[:-4] if name.lower().endswith(".wav") else name
    if "." in stem and stem.rsplit(".", 1)[1].lower() in {"mp3", "flac", "ogg", "m4a", "aac"}:
        return None, (
            f"FILE_NAME {name!r} has an audio extension other than .wav",
            f"songs are always written as WAV: write {stem.rsplit('.', 1)[0]!r} or "
            f"{stem.rsplit('.', 1)[0] + '.wav'!r}",
        )
    if not _SAFE_STEM.match(stem):
        return None, (
            f"FILE_NAME {name!r} contains characters that are unsafe in S3 keys",
            "use only letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(replace spaces with '-')",
        )
    if len(stem) > MAX_FILE_STEM_LENGTH:
        return None, (
            f"FILE_NAME {name!r} is longer than {MAX_FILE_STEM_LENGTH} characters",
            "shorten the name",
        )
    return stem, None


def _split_fields(text: str) -> tuple[str, str, str]:
    """Split a line into prompt, duration and file name (empty when left out)."""
    parts = text.rsplit(";", 2)
    if len(parts) == 3:
        prompt, duration, name = parts
        # "calm piano; soft strings ; 45" means PROMPT ; DURATION with a ';' in the prompt:
        # the last field is a number and the one before it is not.
        if _NUMBER.match(name.strip()) and not _NUMBER.match(duration.strip()):
            return f"{prompt};{duration}", name, ""
        return prompt, duration, name
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return parts[0], "", ""


def _parse_duration(
    text: str, max_duration_s: float
) -> tuple[float | None, tuple[str, str] | None]:
    if not _NUMBER.match(text):
        return None, (
            f"duration {text!r} is not a number",
            "write the duration in seconds as a number, such as 30 or 45.5",
        )
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        return None, (
            f"duration {text!r} is not a positive number of seconds",
            "write a duration greater than 0, such as 30",
        )
    if value > max_duration_s:
        return None, (
            f"duration {value:g} s is over the maximum of {max_duration_s:g} s",
            f"shorten the song to at most {max_duration_s:g} s, or raise MUSICGEN_MAX_DURATION_S",
        )
    return value, None


def parse_job_text(
    text: str,
    *,
    model_id: str,
    settings: GenerationSettings,
    max_duration_s: float = 600.0,
    path: str = "<text>",
) -> JobFile:
    """Parse job lines, collecting every invalid line instead of stopping at the first.

    Args:
        text: The file's content, already decoded.
        model_id: Model id or folder; part of each output name.
        settings: Generation settings; part of each output name.
        max_duration_s: Longest duration accepted, in seconds.
        path: Name of the source, used in messages.
    """
    result = JobFile(path=path)
    seen_names: dict[str, int] = {}
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")

    for line_number, raw_line in enumerate(normalized.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue

        def reject(reason: str, fix: str, line_number=line_number, line=line) -> None:
            result.errors.append(JobLineError(line_number, line, reason, fix))

        prompt, duration_text, name = (part.strip() for part in _split_fields(line))
        if ";" not in line:
            reject(
                "missing fields: expected 'PROMPT ; DURATION_SECONDS ; FILE_NAME'",
                "add the duration in seconds after a ';', for example 'calm piano ; 30 ; calm-piano'",
            )
            continue
        if not prompt:
            reject("the prompt is empty", "write a text prompt before the first ';'")
            continue
        if not duration_text:
            reject(
                "the duration is missing",
                "write the duration in seconds between the separators, such as 'calm piano ; 30'",
            )
            continue
        duration_s, problem = _parse_duration(duration_text, max_duration_s)
        if problem:
            reject(*problem)
            continue
        if name:
            stem, problem = _check_file_name(name)
            if problem:
                reject(*problem)
                continue
        else:
            stem = slugify_prompt(prompt)

        job_hash, seed = hash_job(prompt, duration_s, model_id, settings)
        job = Job(line_number, prompt, duration_s, stem, job_hash, seed)
        first_line = seen_names.get(job.output_name)
        if first_line is not None:
            reject(
                f"writes the same output {job.output_name!r} as line {first_line}",
                "remove the duplicate line, or give it another FILE_NAME or prompt",
            )
            continue
        seen_names[job.output_name] = line_number
        result.jobs.append(job)

    return result


def read_job_file(
    path: str | Path,
    *,
    model_id: str,
    settings: GenerationSettings,
    max_duration_s: float = 600.0,
) -> JobFile:
    """Read and parse a UTF-8 job file, with or without a byte order mark.

    Raises:
        JobFileError: The file is missing or is not valid UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JobFileError(
            str(path),
            ["file not found: create it, or pass another file with -p prompts_path PATH"],
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_number = data[: error.start].count(b"\n") + 1
        raise JobFileError(
            str(path),
            [
                f"line {line_number}: not valid UTF-8 (byte {error.start}). Fix: save the file as UTF-8"
            ],
        ) from error
    return parse_job_text(
        text, model_id=model_id, settings=settings, max_duration_s=max_duration_s, path=str(path)
    )
