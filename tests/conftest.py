"""Tokenizer fixtures: the reference tokenizer shipped with dashscope, ours on the
same vocabulary, and a deterministic mixed-script corpus (also used by
benchmarks/bench_tokenizer.py); token shards in the `qianwen data prep` format;
and the small chat model the serving tests talk to (tests/serving.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

MAX_PIECE_CHARS = 90_000

CHINESE_PROSE = """\
晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。忽逢桃花林，夹岸数百步，中无杂树，芳草鲜美，落英缤纷。渔人甚异之，复前行，欲穷其林。林尽水源，便得一山，山有小口，仿佛若有光。便舍船，从口入。初极狭，才通人。复行数十步，豁然开朗。土地平旷，屋舍俨然，有良田美池桑竹之属。阡陌交通，鸡犬相闻。其中往来种作，男女衣着，悉如外人。黄发垂髫，并怡然自乐。
庆历四年春，滕子京谪守巴陵郡。越明年，政通人和，百废具兴。乃重修岳阳楼，增其旧制，刻唐贤今人诗赋于其上，属予作文以记之。予观夫巴陵胜状，在洞庭一湖。衔远山，吞长江，浩浩汤汤，横无际涯；朝晖夕阴，气象万千。此则岳阳楼之大观也，前人之述备矣。
子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？”曾子曰：“吾日三省吾身：为人谋而不忠乎？与朋友交而不信乎？传不习乎？”
今天早上七点半，我坐地铁去公司。车厢里人很多，大家都低着头看手机。旁边一位老先生在读报纸，标题是《城市交通的新变化》。到站以后，我在楼下买了一杯豆浆和两个包子，一共花了八块五毛钱。
大型语言模型的训练通常分为三个阶段：预训练、监督微调和基于人类反馈的强化学习。预训练阶段使用数万亿个词元的语料，包括网页、书籍、代码和百科全书；监督微调阶段则使用人工编写的高质量对话数据。研究人员发现，数据的质量往往比数量更重要——重复的、低质量的文本会明显降低模型的表现。
“你明天有空吗？”她问。
“有啊，怎么了？”
“我们一起去图书馆吧！听说新开了一个古籍阅览室，里面有很多明清时期的刻本……”
北京时间2023年9月25日，研究团队发布了技术报告，模型参数规模分别为18亿、70亿和140亿。报告指出，分词器的词表大小约为15万，对中文、英文和代码都有较高的压缩率；在多个公开评测集（如C-Eval、MMLU、GSM8K）上，模型取得了同等规模中领先的成绩。
秋天到了，院子里的银杏树叶一片片变黄，风一吹，就像无数只金色的蝴蝶在空中飞舞。奶奶坐在门口的竹椅上，一边剥花生，一边给孙子讲她小时候的故事：那时候没有电灯，晚上只能点煤油灯；冬天很冷，全家人挤在一个炕上取暖。
请注意：本产品含有坚果成分，对坚果过敏者慎用。保质期：十二个月。储存方法：置于阴凉干燥处，避免阳光直射。生产日期见包装背面。客服电话：400-800-1234（工作日9:00—18:00）。
"""

EMOJI = [
    "😀",
    "🎉",
    "🐍",
    "🚀",
    "❤️",
    "👍🏻",
    "👍🏽",
    "👍🏿",
    "🧑🏾‍💻",
    "👨‍👩‍👧‍👦",
    "👩‍❤️‍💋‍👨",
    "🏳️‍🌈",
    "🏴‍☠️",
    "🇨🇳",
    "🇯🇵",
    "🇺🇸",
    "🇪🇺",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "1️⃣",
    "#️⃣",
    "☺︎",
    "🫠",
    "🧬",
]

MIXED_SCRIPTS = [
    "مرحبا بالعالم، هذا نص عربي للاختبار مع أرقام ١٢٣٤٥٦٧٨٩٠.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёжик в тумане.",
    "नमस्ते दुनिया, यह हिन्दी में एक परीक्षण वाक्य है। क्षत्रिय ज्ञान श्री।",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ。カタカナ、ｶﾀｶﾅ、漢字かな交じり文。",
    "다람쥐 헌 쳇바퀴에 타고파. 한국어 문장입니다! 가나다라마바사.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. עברית: דג סקרן שט בים מאוכזב.",
    "ไทย: เป็นมนุษย์สุดประเสริฐเลิศคุณค่า ქართული ენა Հայերեն ትግርኛ",
    "Z̴̧̛a̷͎͝l̶̢̈g̸̱̀o̵̪͑ te\u0301xt wi\u0308th co\u0300mbining ma\u0327rks; Åström Ǆ ǅ ǆ ﬁ ﬂ ℌ ① ㎏ Ⅻ",
    "Mathematical: ∀x∈ℝ, ∃y: x²+y²≤1 ⇒ ∑ᵢ aᵢ ≈ ∫₀^∞ e^{-t} dt. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕋𝕖𝕩𝕥",
    "Wingdings-ish: ☃ ☂ ☎ ✈ ✉ ✓ ✗ ♠ ♣ ♥ ♦ ♪ ♫ ¶ § † ‡ • ‰ ′ ″ ‹ › « » ‐ ‑ ‒ – — ― ‖",
    "Whitespace kinds:\u00a0nbsp\u2002en\u2003em\u2009thin\u200bzw\u3000ideographic\u2028ls\u2029ps\u0085nel\x0bvt\x0cff\x1cfs",
    "Mixed: The 東京 marathon 2024 had 38,000 runners 🏃‍♀️ — да, это правда; नमस्ते; مرحبا; 안녕하세요!",
    "Contractions: I'M sure it's John's; they'VE gone, we'll see, you'd know, she'S here, 'tis 'twas.",
]

NFD_TEXT = unicodedata.normalize(
    "NFD", "Éléonore façonne des crêpes à Noël; Ærøskøbing; Ångström; 가각간갇; résumé naïve coöperate São Paulo"
)


def _stdlib_sources(limit_bytes: int) -> list[str]:
    root = Path(os.path.dirname(os.__file__))
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= limit_bytes:
            break
    return texts


def _chinese(rng: random.Random, n_chars: int) -> str:
    sentences = [s for line in CHINESE_PROSE.splitlines() for s in line.replace("。", "。\n").splitlines() if s]
    common = sorted(set(CHINESE_PROSE) - set("\n"))
    out, size = [], 0
    while size < n_chars:
        kind = rng.random()
        if kind < 0.6:
            piece = "".join(rng.choice(sentences) for _ in range(rng.randint(1, 6))) + "\n"
        elif kind < 0.85:
            piece = "".join(rng.choice(common) for _ in range(rng.randint(5, 60))) + rng.choice("，。！？；：、\n")
        else:
            # Rare ideographs (Extension A/B) fall outside the vocabulary's merges and exercise byte-level pieces.
            pools = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF)]
            lo, hi = rng.choice(pools)
            piece = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))) + "。"
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _emoji(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        piece = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 8))) + rng.choice([" ", "", "\n", " ok ", "!"])
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _whitespace_and_digits(rng: random.Random) -> list[str]:
    docs = [
        " " * 5000 + "x",
        "x" + " " * 5000,
        "\t" * 3000 + "tab\n",
        " \t\n" * 2000 + "end",
        "a\n\n\n\n" * 500 + "\r\n" * 1000 + " \r\n \r\n" * 500,
        "    " * 2000 + "\n" + "  \n" * 1000 + "\n    def f(x):\n        return x\n",
        "\u3000" * 1000 + "全角空格",
        "".join(str(rng.randint(0, 9)) for _ in range(20_000)),
        "π ≈ 3." + "1415926535897932384626433832795028841971693993751058209749445923" * 100,
        " ".join(f"{rng.randint(0, 10**12):,}" for _ in range(2000)),
        "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ０１２３４５６７８９ ⅠⅡⅢ ½ ¾ ²³" * 200,
    ]
    for _ in range(200):
        docs.append(
            "".join(
                rng.choice(["word", " ", "  ", "\t", "\n", "\r\n", " \n", "   x", "12", "。", "é", "\u00a0"])
                for _ in range(rng.randint(1, 200))
            )
        )
    return docs


def split_pieces(text: str, limit: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, preferably at line ends."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or limit
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def mixed_documents(total_bytes: int, seed: int = 0) -> list[str]:
    """Deterministic documents of at most MAX_PIECE_CHARS characters each,
    about `total_bytes` of UTF-8 in all: Python standard-library source (about
    half), Chinese, emoji, many scripts, NFD text, whitespace and digit runs."""
    rng = random.Random(seed)
    rest = [
        _chinese(rng, total_bytes // 12),
        _emoji(rng, total_bytes // 60),
        "\n".join(rng.choice(MIXED_SCRIPTS) for _ in range(total_bytes // 400)),
        "\n".join([NFD_TEXT] * (total_bytes // 2000)),
        *_whitespace_and_digits(rng),
    ]
    rest_bytes = sum(len(t.encode("utf-8")) for t in rest)
    docs = _stdlib_sources(max(total_bytes - rest_bytes, 0)) + rest
    return [piece for doc in docs for piece in split_pieces(doc)]


@pytest.fixture(scope="session")
def vocab_file() -> str:
    import dashscope

    return os.path.join(os.path.dirname(dashscope.__file__), "resources", "qwen.tiktoken")


@pytest.fixture(scope="session")
def ref(vocab_file):
    from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(vocab_file)


@pytest.fixture(scope="session")
def tok(vocab_file):
    from qianwen.tokenizer import Tokenizer

    return Tokenizer.from_file(vocab_file)


@pytest.fixture(scope="session")
def chat_model(tok, tmp_path_factory):
    from serving import small_tokenizer, train_memorizer

    return train_memorizer(small_tokenizer(tok), tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return mixed_documents(2_200_000)


def write_token_shards(out, splits: dict[str, list[int]], tok) -> None:
    """`splits` in the `qianwen data prep` format, one shard per split."""
    tok.save(out / "tokenizer")
    index = {
        "format": "qianwen-tokens/1",
        "dtype": "uint32",
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "tokenizer": str(out / "tokenizer"),
        "splits": {},
    }
    for split, ids in splits.items():
        np.array(ids, dtype="<u4").tofile(out / f"{split}-00000.bin")
        index["splits"][split] = [{"file": f"{split}-00000.bin", "tokens": len(ids), "documents": 1}]
    (out / "index.json").write_text(json.dumps(index))


def torchrun(args: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m qianwen ARGS` under torchrun with gloo processes on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    # A new session, so a hung rank can be killed with the whole group rather than left behind.
    proc = subprocess.Popen(
        [*command, "-m", "qianwen", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
