#!/usr/bin/env python3
"""Golden token ids for the C++ BPE tokenizer, produced by the HuggingFace `tokenizers` library.

Usage: python3 scripts/make_tokenizer_golden.py [TOKENIZER_JSON] [OUTPUT_JSONL]
Defaults: ../shared/data/tokenizer-deepseek-v3/tokenizer.json -> tests/golden/tokenizer/deepseek_v3.jsonl
Needs `pip install tokenizers`. The strings come from seeded generators, so a rerun gives the same file.

Each output line is one JSON object, one of:
  {"text": T, "ids": [...], "ids_plain": [...]}   encode(T) with added tokens matched; ids_plain (only where it
                                                    differs) is T encoded with no added-token matching at all
  {"decode": [...], "text": T}                     decode(ids) with nothing skipped (lossy UTF-8, as HF does)
"""

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer-deepseek-v3" / "tokenizer.json"
DEFAULT_OUTPUT = ROOT / "tests" / "golden" / "tokenizer" / "deepseek_v3.jsonl"

WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have an they which one "
    "you were all her she there would their we him been has when who will no more if out so up said what its "
    "about than into them can only other time new some could these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three tokenizer inference Hopper kernel "
    "DeepSeek attention transformer latency throughput quantization don't I'm they'll we've she'd it's you're "
    "CAPITAL MixedCase camelCase snake_case naïve café résumé coöperate Zürich façade jalapeño"
).split()
PUNCT = list(".,;:!?-'\"()[]{}<>/\\|@#$%^&*_+=~`")

CODE_SNIPPETS = [
    "def {f}({a}, {b}=None):\n    return {a} + {b}\n",
    "for (int {a} = 0; {a} < {n}; ++{a}) {{\n\t{b}[{a}] = {f}({a});\n}}\n",
    "#include <vector>\nstd::vector<int> {a}({n});\n",
    "const {a} = await fetch(`/api/{b}?id=${{{n}}}`);\n",
    "if {a} != nil {{\n\treturn fmt.Errorf(\"{f}: %w\", {a})\n}}\n",
    "{{\"{a}\": {n}, \"{b}\": [true, false, null], \"{f}\": \"x\\ty\"}}",
    "SELECT {a}, COUNT(*) FROM {b} WHERE {f} >= {n} GROUP BY {a};",
    "<div class=\"{a}\"><span id='{b}'>{n}</span></div>",
    "    {a} = {b}.{f}(lambda x: x ** {n})  # comment\n",
    "fn {f}(&mut self, {a}: u32) -> Result<(), Box<dyn Error>> {{ Ok(()) }}",
    "$ ./{f} --{a}={n} -{b} 2>&1 | grep -v '^#'",
    "\\begin{{equation}} {a}_{{{n}}} = \\frac{{{b}}}{{\\sqrt{{{f}}}}} \\end{{equation}}",
    "x{n} := {a}[{n}:{n}+4]  // {b}\r\n",
    "@@ -{n},7 +{n},8 @@\n-    {a}()\n+    {b}({f})\n",
]


def rand_identifier(rng):
    parts = [rng.choice(["get", "set", "tmp", "x", "buf", "i", "count", "_", "Node", "HTTP", "v2", "data"])
             for _ in range(rng.randint(1, 3))]
    sep = rng.choice(["", "_", ""])
    return sep.join(parts)


def english(rng):
    n = rng.randint(1, 40)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        if rng.random() < 0.1:
            w = w.capitalize()
        out.append(w)
        if rng.random() < 0.12:
            out[-1] += rng.choice([",", ".", "!", "?", ";", ":", "...", "'s", ")"])
    s = " ".join(out)
    if rng.random() < 0.3:
        s = rng.choice(["\"", "(", "'", "“", "- "]) + s + rng.choice(["\"", ")", "'", "”", ".\n"])
    return s


def code(rng):
    n = rng.randint(1, 3)
    parts = []
    for _ in range(n):
        parts.append(rng.choice(CODE_SNIPPETS).format(
            f=rand_identifier(rng), a=rand_identifier(rng), b=rand_identifier(rng), n=rng.randint(0, 100000)))
    s = "".join(parts)
    if rng.random() < 0.3:
        s = s.replace("    ", "\t")
    return s


def chars_from(rng, ranges, k):
    out = []
    for _ in range(k):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CJK_RANGES = [(0x4E00, 0x9FA5), (0x9FA6, 0x9FFF), (0x3040, 0x309F), (0x30A0, 0x30FF), (0xAC00, 0xD7A3),
              (0x3000, 0x303F), (0xFF01, 0xFF5E), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x31F0, 0x31FF)]
CJK_PHRASES = ["你好，世界！", "今天天气很好。", "深度求索", "東京都", "こんにちは、元気ですか？", "カタカナとひらがな",
               "안녕하세요", "机器学习模型的推理速度", "「引用」と『二重引用』", "第１２３章", "ｆｕｌｌｗｉｄｔｈ"]


def cjk(rng):
    parts = []
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(CJK_PHRASES))
        elif r < 0.8:
            parts.append(chars_from(rng, CJK_RANGES, rng.randint(1, 12)))
        else:
            parts.append(rng.choice([" ", "\n", "abc", "123", "GPU", " the ", "、", "。", "2024年"]))
    return "".join(parts)


EMOJI = ["😀", "👍", "👍🏽", "❤️", "🇯🇵", "🇺🇸", "👨‍👩‍👧‍👦", "🧑🏿‍💻", "1️⃣", "#️⃣", "🏳️‍🌈", "✨", "🚀", "☕",
         "🤖", "🫠", "🐉", "™", "©", "🔥🔥🔥", "👩‍❤️‍💋‍👨", "🙂‍↕️"]


def emoji(rng):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.5:
            parts.append(rng.choice(EMOJI))
        elif r < 0.75:
            parts.append(chr(rng.randint(0x1F300, 0x1FAFF)))
        else:
            parts.append(rng.choice([" ", "ok", " wow", "!", "\n", "😀 and ", "x"]))
    return "".join(parts)


RTL_PHRASES = ["مرحبا بالعالم", "السَّلَامُ عَلَيْكُمْ", "שָׁלוֹם עוֹלָם", "עברית", "اللغة العربية ١٢٣٤", "فارسی ۱۲۳",
               "\u200fمرحبا\u200e", "ئۇيغۇرچە"]


def rtl(rng):
    parts = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(RTL_PHRASES))
        elif r < 0.8:
            parts.append(chars_from(rng, [(0x0600, 0x06FF), (0x0590, 0x05FF), (0x0750, 0x077F), (0xFB50, 0xFDFF)],
                                    rng.randint(1, 10)))
        else:
            parts.append(rng.choice([" ", " (GPU) ", "42", ".", "\n", "،", "؟"]))
    return "".join(parts)


SPACES = [" ", "  ", "\t", "\n", "\r", "\r\n", "\n\n", "\u00a0", "\u3000", "\u2028", "\u2029", "\x0b", "\x0c",
          "\u200b", "\u2003", "\u0085", "\u1680", "\u202f", "\ufeff"]


def whitespace(rng):
    parts = []
    for _ in range(rng.randint(1, 10)):
        if rng.random() < 0.6:
            parts.append("".join(rng.choice(SPACES) for _ in range(rng.randint(1, 8))))
        else:
            parts.append(rng.choice(["a", "word", "x.", "!", "12", "中", "é", "--", "\"q\"", "Hello", "é́"]))
    return "".join(parts)


def digits(rng):
    parts = []
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.4:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
        elif r < 0.55:
            parts.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 6)}f}")
        elif r < 0.75:
            parts.append(chars_from(rng, [(0x0660, 0x0669), (0x06F0, 0x06F9), (0x0966, 0x096F), (0xFF10, 0xFF19),
                                          (0x2160, 0x2188), (0x00B2, 0x00B3), (0x00BC, 0x00BE), (0x2070, 0x2079),
                                          (0x2460, 0x249B), (0x1D7CE, 0x1D7FF)], rng.randint(1, 7)))
        else:
            parts.append(rng.choice([" ", ",", ".", "-", "e+10", "0x1F", "v1.2.3", " x ", "%", "$", "1e-5", "\n"]))
    return "".join(parts)


def special_inside(rng, added):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(added))
        elif r < 0.5:
            tok = rng.choice(added)
            cut = rng.randint(1, len(tok) - 1)
            parts.append(tok[:cut] if rng.random() < 0.5 else tok[cut:])
        else:
            parts.append(rng.choice([english(rng), " ", "\n", "<", "｜", ">", "<｜", "｜>", "▁", "x", "123",
                                     "<think>", "</think>", "你好", "😀"]))
    return "".join(parts)


SOUP_RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x36F), (0x370, 0x3FF), (0x400, 0x52F), (0x900, 0x97F),
               (0x980, 0x9FF), (0xE00, 0xE7F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x20A0, 0x20CF),
               (0x2100, 0x22FF), (0x2500, 0x27BF), (0x2C00, 0x2E7F), (0x10000, 0x1007F), (0x1D400, 0x1D7FF),
               (0xE000, 0xE0FF), (0xF900, 0xFAFF), (0xFE00, 0xFE0F), (0x0, 0x1F), (0x7F, 0x9F), (0x10FF00, 0x10FFFF),
               (0x1100, 0x11FF), (0x0300, 0x036F), (0x1AB0, 0x1AFF)]


def soup(rng):
    return chars_from(rng, SOUP_RANGES, rng.randint(1, 30))


def markup(rng):
    templates = ["https://example.com/{a}?q={n}&lang=en#frag", "mailto:{a}@{b}.org", "/usr/local/{a}/{b}.so.{n}",
                 "C:\\Users\\{a}\\{b}.txt", "## {a}\n\n- [ ] {b}\n- [x] `{n}`\n", "**{a}** _{b}_ ~~{n}~~",
                 "| {a} | {b} |\n|---|---:|\n| {n} | 0 |", "$$\\sum_{{i=1}}^{{{n}}} {a}_i$$", "'''{a}'''...!!!???",
                 "-->{a}<--", "\"{a}\":\"{b}\",\"n\":{n}", "…{a}—{b}–{n}", "«{a}» „{b}“ ‹{n}›"]
    return rng.choice(templates).format(a=rand_identifier(rng), b=rand_identifier(rng), n=rng.randint(0, 99999))


def fixed_cases(added):
    cases = ["", " ", "a", "Hello world", "Hello, world!", "  leading", "trailing  ", "\n", "\r\n", "\t\t",
             "don't", "I'M", "'s", "a\u0301", "\u0301", "x" * 300, " " * 257, "\n" * 40, "1" * 50, "ab" * 200,
             "😀" * 30, "中" * 100, "<｜User｜>", "<｜User｜><｜Assistant｜>", "<<｜User｜>>", "<｜User｜|>"]
    cases += [chr(c) for c in range(0, 128)]
    cases += [chr(c) for c in range(0x80, 0x800, 7)]
    cases += [a for a in added]
    return cases


def main():
    tokenizer_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TOKENIZER
    output_path = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUTPUT
    tok = Tokenizer.from_file(str(tokenizer_path))
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    added = [a["content"] for a in spec["added_tokens"]]
    added_sample = added[:3] + added[-20:] + random.Random(7).sample(added, 30)

    rng = random.Random(20240611)
    generators = [(english, 320), (code, 320), (cjk, 260), (emoji, 180), (rtl, 150), (whitespace, 260),
                  (digits, 200), (soup, 260), (markup, 120)]
    texts = fixed_cases(added_sample)
    for gen, count in generators:
        texts += [gen(rng) for _ in range(count)]
    texts += [special_inside(rng, added) for _ in range(260)]
    texts += ["".join(rng.choice(texts) for _ in range(rng.randint(2, 4))) for _ in range(120)]

    plain_pre = tok.pre_tokenizer
    lines = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)
        record = {"text": text, "ids": ids}
        plain = [t.id for piece, _ in plain_pre.pre_tokenize_str(text) for t in tok.model.tokenize(piece)]
        if plain != ids:
            record["ids_plain"] = plain
        lines.append(json.dumps(record, ensure_ascii=False))

    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    for _ in range(300):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))]
        lines.append(json.dumps({"decode": ids, "text": tok.decode(ids, skip_special_tokens=False)},
                                ensure_ascii=False))

    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} encode and 300 decode cases to {output_path}")


if __name__ == "__main__":
    main()
