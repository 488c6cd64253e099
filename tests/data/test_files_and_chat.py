"""Record files with line-numbered errors; chat records through the chat template."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from caikit_tuning.data import collate_causal, collect_records, read_records_file
from caikit_tuning.data.tokenize import tokenize_chat


def test_reads_json_jsonl_and_csv(tmp_path):
    rows = [{"input": "a, b", "output": "x"}, {"input": 'c "q"', "output": "y"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "r.csv").write_text('input,output\n"a, b",x\n"c ""q""",y\n')
    assert read_records_file(tmp_path / "r.json") == rows
    assert read_records_file(tmp_path / "r.jsonl") == rows
    assert read_records_file(tmp_path / "r.csv") == rows


def test_unicode_line_separators_inside_text_are_kept(tmp_path):
    # Real reviews contain U+0085 and U+2028; only "\n" ends a JSONL record.
    rows = [{"input": "ambition\u0085 whole", "output": "a\u2028b"}, {"input": "x", "output": "y"}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "u.jsonl").write_text(text, encoding="utf-8", newline="")
    assert read_records_file(tmp_path / "u.jsonl") == rows
    (tmp_path / "u.csv").write_text(
        'input,output\n"two\nlines",a\u0085b\nc,d,e\n', encoding="utf-8", newline=""
    )
    with pytest.raises(ValueError, match="u.csv line 4: 3 columns"):
        read_records_file(tmp_path / "u.csv")


def test_bundled_data_files_read_whole():
    root = Path(__file__).resolve().parents[2] / "data"
    for name, count in [("rt_sentiment_train.jsonl", 4379), ("rt_sentiment_test.jsonl", 400)]:
        assert len(read_records_file(root / name)) == count


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"input": "a", "output": "b"}\n{"input": oops}\n',
            "bad.jsonl line 2: invalid JSON",
        ),
        (
            "bad.jsonl",
            '{"input": "a", "output": "b"}\n[1, 2]\n',
            "bad.jsonl line 2: expected a JSON object",
        ),
        ("bad.json", '[\n{"input": "a"},\n{"input": }\n]', "bad.json line 3: invalid JSON"),
        ("bad.json", '{"input": "a"}', "bad.json line 1: expected a JSON array"),
        (
            "bad.csv",
            "input,output\na,b\nc,d,e\n",
            "bad.csv line 3: 3 columns, but the header has 2",
        ),
        ("bad.csv", "", "bad.csv line 1: missing the header"),
        ("bad.txt", "x", "unsupported file type '.txt'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_records_file(tmp_path / name)


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xff"}\n')
    with pytest.raises(ValueError, match="bin.jsonl line 2: not valid UTF-8"):
        read_records_file(tmp_path / "bin.jsonl")


def test_chat_records_are_checked():
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    assert collect_records([good]) == [good]
    with pytest.raises(ValueError, match="last message must be the assistant"):
        collect_records([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="role 'robot'"):
        collect_records(
            [
                {
                    "messages": [
                        {"role": "robot", "content": "x"},
                        {"role": "assistant", "content": "y"},
                    ]
                }
            ]
        )
    with pytest.raises(ValueError, match="mixes chat records"):
        collect_records([good, {"input": "a", "output": "b"}])


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]


def test_chat_target_is_the_last_assistant_turn(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    example = tokenize_chat(tokenizer, CHAT, "last_assistant", 512, 64)
    assert tokenizer.decode(example.target_ids) == "see you</s>"
    assert example.source_targets == ()
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(example.source_ids + example.target_ids) == full.rstrip("\n")


def test_assistant_loss_learns_earlier_assistant_turns_only(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    example = tokenize_chat(tokenizer, CHAT, "assistant", 512, 64)
    learned = tokenizer.decode([example.source_ids[i] for i in example.source_targets])
    assert learned == "hello there</s>\n" or learned == "hello there</s>"
    everything = tokenize_chat(tokenizer, CHAT, "all", 512, 64)
    assert len(everything.source_targets) == len(everything.source_ids) - 1
    batch = collate_causal([example], pad_id=0)
    assert batch.num_target_tokens == len(example.source_targets) + len(example.target_ids)
    # Position p predicts token p + 1.
    for position, target in zip(
        batch.target_positions[0].tolist(), batch.target_ids[0].tolist(), strict=True
    ):
        assert (example.source_ids + example.target_ids)[position + 1] == target
