"""`synth_textvqa`: a deterministic, generated text-in-image VQA set (the embedded TextVQA substitute, issue 10).

Every item is rendered with Pillow from a seed: a sign, a product label, a price tag or a licence
plate carrying 1–2 text fields plus distractor words, a question about one field, 10 annotator
answers (the right answer in normalisation variants — case, articles, punctuation, number words —
plus up to two annotator slips) and ``ocr_tokens`` (every rendered word, in reading order), as in
TextVQA. Rows: ``{question_id, question, image, answers[10], ocr_tokens}`` with ``image`` the
PNG's path relative to the split files, content-addressed (``images/<sha256>.png``).

Determinism: item i of split s depends only on (seed, s, i) (``random.Random(f"{seed}/{s}/{i}")``,
which Python hashes with SHA-512, independent of PYTHONHASHSEED), so a smaller split is a prefix
of a larger one. Text is drawn with Pillow's built-in font (``ImageFont.load_default(size)``), not a
system font, so the pixels depend only on the Pillow / FreeType / zlib versions, which
:func:`generator_info` records for the data manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from ..errors import T2EvalError

GENERATOR = "t2eval.data.synth_textvqa"
GENERATOR_VERSION = "1"
SPLITS = ("train", "valid", "test")
DEFAULT_SIZES = {"train": 2000, "valid": 200, "test": 500}
KINDS = ("sign", "label", "price", "plate")

_SIGN_WORDS = ("stop", "exit", "open", "closed", "parking", "bakery", "pharmacy", "library", "museum", "hotel",
               "station", "market", "garden", "harbor", "school", "theater", "cinema", "bank", "police", "airport",
               "bridge", "tunnel", "ferry", "plaza", "castle", "river", "forest", "canyon", "valley", "summit")
_BRANDS = ("acme", "zenith", "nova", "orbit", "pioneer", "summit", "vertex", "lumen", "aurora", "delta", "falcon",
           "granite", "harbor", "ion", "jade", "kestrel", "lotus", "meridian", "nimbus", "onyx", "quartz", "raven")
_PRODUCTS = ("tea", "coffee", "honey", "rice", "soap", "juice", "bread", "milk", "salt", "jam", "flour", "oats",
             "pasta", "cocoa", "butter", "cheese", "lemons", "apples", "beans", "pepper")
_DISTRACTORS = ("sale", "new", "fresh", "welcome", "only", "best", "daily", "since", "organic", "free", "extra",
                "city", "north", "south", "east", "west", "local", "open", "premium", "classic")
_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
                 "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
_PALETTE = ((200, 30, 30), (30, 90, 170), (20, 120, 60), (240, 200, 40), (245, 245, 240), (30, 30, 30),
            (120, 60, 140), (230, 120, 30))


def generator_info() -> dict:
    """What the manifest records about the generator and the rendering stack."""
    import zlib

    import PIL
    from PIL import features

    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "pillow": PIL.__version__,
            "freetype": features.version("freetype2"), "zlib": zlib.ZLIB_VERSION, "font": "Pillow built-in (load_default)"}


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _contrast(bg: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    dark = sum(bg) / 3 < 128
    choices = [c for c in _PALETTE if (sum(c) / 3 > 150) == dark and abs(sum(c) - sum(bg)) > 200]
    return rng.choice(choices or [(255, 255, 255) if dark else (0, 0, 0)])


def _spec(kind: str, rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
    """([(role, text)] fields in reading order, the asked role, the question)."""
    if kind == "sign":
        word = rng.choice(_SIGN_WORDS)
        if rng.random() < 0.5:
            return [("main", word.upper())], "main", rng.choice(("What does the sign say?", "What is written on the sign?"))
        n = str(rng.randint(1, 10)) if rng.random() < 0.5 else str(rng.randint(11, 99))
        return ([("main", word.upper()), ("number", f"{n} KM")], "number" if rng.random() < 0.5 else "main",
                "")
    if kind == "label":
        brand, product = rng.choice(_BRANDS), rng.choice(_PRODUCTS)
        asked = rng.choice(("brand", "product"))
        q = "What is the brand name on the label?" if asked == "brand" else "What product is this label for?"
        return [("brand", brand.capitalize()), ("product", product.upper())], asked, q
    if kind == "price":
        product = rng.choice(_PRODUCTS)
        price = f"${rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
        fields = [("product", product.capitalize()), ("price", price)]
        return fields, "price", rng.choice((f"How much does the {product} cost?", "What is the price?"))
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(3))
    plate = f"{letters} {rng.randint(100, 9999)}"
    return [("plate", plate)], "plate", rng.choice(("What is the licence plate number?", "What does the plate say?"))


def _answers(answer: str, rng: random.Random, distractor: str) -> list[str]:
    """10 annotator answers: variants that normalise to `answer` (EvalAI) plus up to 2 slips."""
    low = answer.lower()
    variants = [low, answer, low.capitalize(), f"the {low}", f"{low}.", low.upper()]
    if low in _NUMBER_WORDS:
        variants.append(_NUMBER_WORDS[low])
    n_slips = rng.choice((0, 0, 1, 2))
    out = [rng.choice(variants) for _ in range(10 - n_slips)]
    out += [rng.choice((distractor.lower(), f"{low} {distractor.lower()}", "unanswerable"))] * n_slips
    rng.shuffle(out)
    return out


def _render(fields: list[str], rng: random.Random) -> bytes:
    """A PNG with every line of `fields` drawn in full (the canvas grows to fit them)."""
    from PIL import Image, ImageDraw

    sizes = [rng.randint(14, 20) for _ in fields]
    gaps = [rng.randint(4, 10) for _ in fields]
    fonts = [_font(z) for z in sizes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textlength(t, font=f) for t, f in zip(fields, fonts)]
    need_w = int(max(widths)) + 28
    need_h = 16 + sum(z + g for z, g in zip(sizes, gaps))
    w, h = max(rng.randint(112, 176), need_w), max(rng.randint(72, 128), need_h)
    bg = rng.choice(_PALETTE)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    d.rectangle([3, 3, w - 4, h - 4], outline=_contrast(bg, rng), width=2)
    y = 8 + rng.randint(0, max(0, h - need_h))
    for text, size, gap, font, tw in zip(fields, sizes, gaps, fonts, widths):
        slack = max(0, int((w - 28 - tw) / 2))
        x = 14 + slack + rng.randint(-min(6, slack), min(6, slack))
        d.text((x, y), text, fill=_contrast(bg, rng), font=font)
        y += size + gap
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate_item(split: str, index: int, seed: int = 0) -> tuple[dict, bytes]:
    """(row, PNG bytes) of item `index` of `split`; row["image"] is ``images/<sha256>.png``."""
    if split not in SPLITS:
        raise T2EvalError(f"unknown synth_textvqa split {split!r}: use {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}/{split}/{index}")
    kind = rng.choice(KINDS)
    fields, asked, question = _spec(kind, rng)
    if not question:  # a sign with a distance: ask for the name or the distance
        question = "How many kilometres away is it?" if asked == "number" else "Which place does the sign point to?"
    asked_text = dict(fields)[asked]
    answer = asked_text.split()[0] if asked == "number" else asked_text
    distractors = rng.sample(_DISTRACTORS, rng.randint(1, 2))
    lines = [t for _, t in fields]
    for dword in distractors:  # distractor words above or below the fields
        lines.insert(rng.choice((0, len(lines))), dword.upper() if rng.random() < 0.5 else dword.capitalize())
    png = _render(lines, rng)
    sha = hashlib.sha256(png).hexdigest()
    row = {"question_id": f"synth-{split}-{index:05d}", "question": question, "image": f"images/{sha}.png",
           "answers": _answers(answer, rng, distractors[0]), "ocr_tokens": [tok for ln in lines for tok in ln.split()],
           "kind": kind, "answer": answer}
    return row, png


def generate(out_dir: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Write ``<out>/<split>.jsonl`` and ``<out>/images/<sha256>.png``; returns (and writes as
    ``<out>/generator.json``) the generator record: version, Pillow/FreeType/zlib, seed, sizes, file hashes."""
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    bad = [s for s in sizes if s not in SPLITS or int(sizes[s]) < 0]
    if bad:
        raise T2EvalError(f"bad synth_textvqa sizes {sizes!r}: splits are {', '.join(SPLITS)}, sizes ≥ 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in sizes.items():
        lines = []
        for i in range(int(n)):
            row, png = generate_item(split, i, seed)
            img = out / row["image"]
            if not img.exists() or img.read_bytes() != png:  # a changed file is rewritten
                tmp = img.with_suffix(".png.tmp")
                tmp.write_bytes(png)
                tmp.replace(img)
            lines.append(json.dumps(row, sort_keys=True))
        text = "\n".join(lines) + ("\n" if lines else "")
        (out / f"{split}.jsonl").write_text(text)
        files[f"{split}.jsonl"] = {"rows": int(n), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    info = dict(generator_info(), seed=seed, sizes=sizes, files=files)
    (out / "generator.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def validate(out_dir: str | Path, sizes: dict[str, int] | None = None) -> None:
    """Raise T2EvalError unless every row has 10 answers, a decodable image with the sha256 it is named
    after, and the expected row counts."""
    from PIL import Image

    out = Path(out_dir)
    for split, n in (sizes or DEFAULT_SIZES).items():
        f = out / f"{split}.jsonl"
        if not f.exists():
            raise T2EvalError(f"{f} missing: run the synth_textvqa generator")
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if len(rows) != n:
            raise T2EvalError(f"{f}: {len(rows)} rows, expected {n}")
        for r in rows:
            if len(r.get("answers", [])) != 10:
                raise T2EvalError(f"{f} {r.get('question_id')}: {len(r.get('answers', []))} answers, expected 10")
            p = out / r["image"]
            data = p.read_bytes() if p.exists() else b""
            if hashlib.sha256(data).hexdigest() != p.stem:
                raise T2EvalError(f"{p}: missing or not the content its name addresses")
            try:
                Image.open(io.BytesIO(data)).load()
            except Exception as e:  # noqa: BLE001 - any decoder failure is a broken image
                raise T2EvalError(f"{p} does not decode: {e}") from None
