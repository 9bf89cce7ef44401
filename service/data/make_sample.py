"""Generate tuneserve's own AdvertiseGen-style sample dataset (no downloaded data).

Each row is {"content": "类型#裙*材质#蕾丝*风格#性感", "summary": "<a Chinese sales paragraph>"}:
the tag string is drawn from per-category attribute vocabularies, and the paragraph is
assembled from phrase templates keyed by (attribute, value), so the summary really depends
on the tags and a LoRA adapter has something learnable to pick up. Fixed seed: running this
again rewrites byte-identical files.

    python service/data/make_sample.py            # writes advertisegen_sample{,_val}.jsonl beside this file
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 300
N_VALIDATION = 40

# Category -> attribute -> values. Attribute names follow AdvertiseGen's tag vocabulary.
CATEGORIES: dict[str, dict[str, list[str]]] = {
    "裙": {
        "材质": ["蕾丝", "雪纺", "棉", "真丝", "针织", "牛仔"],
        "颜色": ["白色", "黑色", "红色", "粉色", "藏青色", "杏色"],
        "风格": ["性感", "清新", "复古", "淑女", "简约", "文艺"],
        "图案": ["碎花", "波点", "格子", "纯色", "条纹"],
        "裙长": ["短裙", "中长裙", "长裙"],
        "裙型": ["a字", "百褶", "包臀裙", "鱼尾"],
        "领型": ["v领", "圆领", "方领", "一字领"],
    },
    "上衣": {
        "材质": ["棉", "针织", "雪纺", "亚麻", "羊毛"],
        "颜色": ["白色", "黑色", "灰色", "米色", "蓝色", "卡其色"],
        "风格": ["休闲", "通勤", "街头", "简约", "甜美"],
        "图案": ["字母", "纯色", "条纹", "刺绣", "印花"],
        "版型": ["宽松", "修身", "落肩"],
        "袖长": ["短袖", "长袖", "七分袖", "无袖"],
        "领型": ["圆领", "v领", "翻领", "高领"],
    },
    "裤": {
        "材质": ["牛仔", "棉", "亚麻", "羊毛", "灯芯绒"],
        "颜色": ["黑色", "蓝色", "白色", "卡其色", "军绿色"],
        "风格": ["休闲", "街头", "通勤", "复古", "运动"],
        "裤长": ["九分裤", "七分裤", "长裤", "短裤"],
        "裤型": ["阔腿裤", "直筒裤", "哈伦裤", "铅笔裤"],
        "裤腰型": ["高腰", "中腰", "松紧腰"],
    },
    "外套": {
        "材质": ["羊毛", "牛仔", "皮革", "羽绒", "棉"],
        "颜色": ["黑色", "驼色", "灰色", "军绿色", "酒红色"],
        "风格": ["复古", "简约", "帅气", "通勤", "英伦"],
        "版型": ["宽松", "修身", "oversize"],
        "衣长": ["短款", "中长款", "长款"],
        "领型": ["翻领", "连帽", "立领", "西装领"],
    },
}

# Phrases per attribute; "{v}" is the tag's value, "{t}" the category.
PHRASES: dict[str, list[str]] = {
    "材质": ["选用{v}面料，触感细腻舒适", "{v}材质亲肤透气，穿着没有负担", "采用优质{v}，质感出众又耐穿"],
    "颜色": ["{v}的配色低调耐看", "经典{v}百搭不挑人，显白又大方", "一抹{v}让整体造型更有气质"],
    "风格": ["整体呈现{v}的风格", "{v}风十足，轻松穿出个人态度", "演绎出满满的{v}韵味"],
    "图案": ["{v}图案点缀其间，增添活力", "精致的{v}元素让设计更有看点", "{v}设计简单却不单调"],
    "裙长": ["{v}的长度恰到好处，行走间灵动飘逸", "{v}设计修饰腿部线条"],
    "裙型": ["{v}裙摆勾勒出优美的身形", "{v}的剪裁很显腰身"],
    "领型": ["{v}设计修饰脸型与颈部线条", "利落的{v}凸显干练气质"],
    "版型": ["{v}版型包容性强，遮肉显瘦", "{v}的剪裁穿着舒适不拘束"],
    "袖长": ["{v}设计方便活动", "{v}款式适合多个季节穿搭"],
    "裤长": ["{v}的长度露出脚踝，显高显瘦", "{v}设计拉长腿部比例"],
    "裤型": ["{v}的廓形修饰腿型，走路带风", "{v}版型利落有型"],
    "裤腰型": ["{v}设计提升腰线，打造大长腿", "{v}穿着舒适又不勒"],
    "衣长": ["{v}的设计适合各种身高", "{v}版型保暖又有型"],
}
OPENINGS = ["这款{t}", "这一款{t}", "这件{t}", "此款{t}"]
CLOSINGS = [
    "日常出街或约会都能轻松驾驭。",
    "无论是上班通勤还是周末出游都很合适。",
    "是衣橱里不可或缺的百搭单品。",
    "轻松打造时髦又舒适的造型。",
]


def make_row(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    attributes = CATEGORIES[category]
    names = rng.sample(sorted(attributes), k=rng.randint(3, min(5, len(attributes))))
    tags = [("类型", category)] + [(name, rng.choice(attributes[name])) for name in names]
    content = "*".join(f"{k}#{v}" for k, v in tags)
    clauses = [rng.choice(PHRASES[k]).format(v=v, t=category) for k, v in tags[1:]]
    summary = rng.choice(OPENINGS).format(t=category) + "，" + "，".join(clauses) + "，" + rng.choice(CLOSINGS)
    return {"content": content, "summary": summary}


def generate(n: int, rng: random.Random) -> list[dict[str, str]]:
    return [make_row(rng) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train", type=int, default=N_TRAIN)
    parser.add_argument("--validation", type=int, default=N_VALIDATION)
    args = parser.parse_args()
    rng = random.Random(SEED)
    write_jsonl(args.out_dir / "advertisegen_sample.jsonl", generate(args.train, rng))
    write_jsonl(args.out_dir / "advertisegen_sample_val.jsonl", generate(args.validation, rng))


if __name__ == "__main__":
    main()
