"""Build and save a tiny, randomly initialised MusicGen checkpoint for tests and offline runs.

The checkpoint keeps every property the generation code depends on from the real
``facebook/musicgen-small``: a 32 kHz EnCodec with a hop length of 640 samples (50 Hz
frame rate), 4 codebooks per channel, the decoder's 2048-position limit, and a T5 text
encoder with a processor. Only the widths, depths and vocabularies are tiny, so the
folder is a few megabytes, builds in seconds on a CPU, and loads with the same
``from_pretrained`` calls as a hub checkpoint.

Run it as ``python -m mgutil.tiny_model DIR [--stereo]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

SAMPLING_RATE = 32_000
# 8 * 5 * 4 * 4 = 640 samples per frame, so 32 kHz / 640 = 50 frames per second.
UPSAMPLING_RATIOS = (8, 5, 4, 4)
CODEBOOKS_PER_CHANNEL = 4
CODEBOOK_SIZE = 64
# The real decoder's position limit, so window checks behave as with a hub checkpoint.
MAX_POSITION_EMBEDDINGS = 2048

# A small corpus for training the tokenizer: words that musical prompts use.
_TOKENIZER_CORPUS = """
lofi hip hop beat with warm piano chords and vinyl crackle, relaxed tempo
epic orchestral soundtrack with strings, brass and thundering timpani
upbeat synthwave track with a driving bassline, 80s drums and bright arpeggios
acoustic folk guitar ballad; gentle fingerpicking, soft harmonica, campfire mood
ambient drone with evolving pads, field recordings and slow reverb tails
jazz trio with walking bass, brushed drums and a mellow saxophone melody
heavy metal riff with distorted guitars, double kick drums and a fast tempo
bossa nova with nylon guitar, light percussion and a breezy flute
techno groove at 128 bpm with a punchy kick, hats and a hypnotic synth
classical string quartet in a minor key, slow and melancholic
reggae rhythm with offbeat guitar skank, deep bass and dub delays
cinematic piano theme, emotional, building to a full choir
""".strip().splitlines()


def _build_tokenizer(vocab_size: int = 256):
    """Train a Unigram tokenizer on the corpus and wrap it as a transformers T5 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    special_tokens = ["<pad>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, unk_token="<unk>"
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)

    # The trained Unigram model stores (piece, log probability) pairs, which is the
    # vocabulary format that T5Tokenizer takes.
    vocab = [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_model(stereo: bool = False, seed: int = 0):
    """Build a tiny random MusicGen model and its processor.

    Args:
        stereo: Build the stereo variant (2 audio channels, 8 codebooks) instead of mono.
        seed: Seed for the random weights, so two builds are identical.

    Returns:
        A ``(model, processor)`` pair.
    """
    import torch
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
    )

    tokenizer = _build_tokenizer()
    audio_channels = 2 if stereo else 1

    # EnCodec picks its number of codebooks from the bandwidth:
    # 1000 * bandwidth // (frame_rate * bits per code). Solve for exactly 4.
    frame_rate = math.ceil(SAMPLING_RATE / math.prod(UPSAMPLING_RATIOS))
    bits_per_code = int(math.log2(CODEBOOK_SIZE))
    bandwidth_kbps = CODEBOOKS_PER_CHANNEL * frame_rate * bits_per_code / 1000
    audio_encoder = EncodecConfig(
        sampling_rate=SAMPLING_RATE,
        audio_channels=1,  # MusicGen encodes each channel of a stereo song separately.
        target_bandwidths=[bandwidth_kbps],
        upsampling_ratios=list(UPSAMPLING_RATIOS),
        num_filters=4,
        hidden_size=16,
        num_lstm_layers=1,
        codebook_size=CODEBOOK_SIZE,
        use_causal_conv=False,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
    )
    if audio_encoder.num_quantizers != CODEBOOKS_PER_CHANNEL:
        raise RuntimeError(
            f"tiny EnCodec has {audio_encoder.num_quantizers} codebooks, "
            f"expected {CODEBOOKS_PER_CHANNEL}"
        )

    text_encoder = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        hidden_size=32,
        num_codebooks=CODEBOOKS_PER_CHANNEL * audio_channels,
        audio_channels=audio_channels,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
    )
    config = MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)
    config.decoder_start_token_id = CODEBOOK_SIZE
    config.pad_token_id = CODEBOOK_SIZE

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config)
    # transformers initialises EnCodec's codebooks to zeros, which would decode every
    # code to the same audio. Random codebooks make the audio depend on the codes, as in
    # a trained checkpoint, so seeds and continuations are observable in tests.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_(std=0.05)
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.cluster_size.fill_(1.0)
    model.eval()
    # The same sampling defaults as the hub checkpoints' generation_config.json.
    model.generation_config = GenerationConfig(
        do_sample=True,
        guidance_scale=3.0,
        top_k=250,
        max_length=1500,
        bos_token_id=CODEBOOK_SIZE,
        pad_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
    )

    feature_extractor = EncodecFeatureExtractor(
        feature_size=audio_channels, sampling_rate=SAMPLING_RATE, padding_value=0.0
    )
    processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return model, processor


def save_tiny_model(directory: str | Path, stereo: bool = False, seed: int = 0) -> Path:
    """Build the tiny model and save it with its processor into ``directory``."""
    directory = Path(directory)
    model, processor = build_tiny_model(stereo=stereo, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    logger.info("saved tiny %s MusicGen to %s", "stereo" if stereo else "mono", directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mgutil.tiny_model",
        description="Save a tiny, randomly initialised MusicGen checkpoint that "
        "MusicgenForConditionalGeneration.from_pretrained(DIR) loads.",
    )
    parser.add_argument("directory", help="folder to write the checkpoint into")
    parser.add_argument(
        "--stereo", action="store_true", help="build the 2-channel variant (8 codebooks)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    save_tiny_model(args.directory, stereo=args.stereo, seed=args.seed)


if __name__ == "__main__":
    main()
