"""scripts/chat.py: a terminal chat with a composer checkpoint or an exported Hugging Face folder.

A tiny real MPT (random weights, peaky logits so greedy decoding has no near-ties) is saved as a composer
checkpoint and exported to a Hugging Face folder with the bundled tokenizer. The script runs as a subprocess with
turns on stdin; each streamed (KV cache) reply must equal a direct greedy ``generate_ids`` from the same prompt
text, built from the same conversation (earlier turns included, and dropped after /reset).
"""
from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmfoundry.checkpoint import convert_composer_to_hf, save_composer_weights
from llmfoundry.data.finetune import format_chat_prompt
from llmfoundry.data.tokenizer import load_tokenizer
from llmfoundry.generate import SamplingConfig, generate_ids
from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "chat.py"
NEW = 12  # --max_new_tokens of the conversations
# A chat template of our own: each message is "<<role>> text <<end>>", the reply starts after "<<assistant>> ".
TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }} <<end>>\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>> {% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model, its composer checkpoint (config and tokenizer recorded), its HF export, and an HF folder whose
    tokenizer carries ``TEMPLATE`` as its chat template."""
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=4096,
                    init_config={"name": "normal_", "init_std": 0.2})
    model = MPTForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("chat")
    ckpt = save_composer_weights(model.state_dict(), cfg, str(d / "w.pt"), tokenizer="bundled")
    hf = convert_composer_to_hf(ckpt, str(d / "hf"))
    templated = str(d / "hf-template")
    shutil.copytree(hf, templated)
    tok = load_tokenizer(hf)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(templated)
    return SimpleNamespace(model=model, ckpt=ckpt, hf=hf, templated=templated, dir=d, tok=load_tokenizer("bundled"))


def run_chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def load_script():
    spec = importlib.util.spec_from_file_location("chat_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def direct_reply(model, tok, prompt: str, stops=("<|im_end|>",), n: int = NEW) -> str:
    """The greedy reply to ``prompt`` the plain way: ``generate_ids`` on the whole prompt, decoded, cut at the
    first stop string."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = generate_ids(model, [ids], SamplingConfig(max_new_tokens=n), eos_token_id=tok.eos_token_id)[0]
    text = tok.decode(new, skip_special_tokens=True)
    cuts = [text.index(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def expected_replies(model, tok, lines, render=format_chat_prompt, stops=("<|im_end|>",), system=None):
    """The replies a conversation over ``lines`` (messages and /reset) should get, computed turn by turn."""
    head = [{"role": "system", "content": system}] if system else []
    history, replies = [], []
    for line in lines:
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = direct_reply(model, tok, render(head + history), stops)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def transcript(replies) -> str:
    return "".join(f"assistant> {r}\n" for r in replies)


def test_checkpoint_conversation_with_reset(tiny):
    """Two turns, /reset, one more, greedy: each streamed reply is the direct greedy reply to the conversation so
    far (turn 2 sees turn 1; turn 3 does not), the chat ends at EOF with exit 0, stats go to stderr."""
    lines = ["Hello there, who are you?", "Please write a function that adds numbers.", "/reset", "class Point:"]
    r = run_chat(tiny.ckpt, "--temperature", "0", "--max_new_tokens", str(NEW), stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    expected = expected_replies(tiny.model, tiny.tok, lines)
    assert r.stdout == transcript(expected)
    assert r.stderr.count("tokens/s") == 3 and "(conversation cleared)" in r.stderr
    assert "Traceback" not in r.stderr
    # the comparison tells the cases apart: without its history turn 2 gets another reply, and turn 3 with the
    # history it was cleared of would too
    u1, u2, u3 = lines[0], lines[1], lines[3]
    alone = direct_reply(tiny.model, tiny.tok, format_chat_prompt([{"role": "user", "content": u2}]))
    assert alone != expected[1]
    carried = format_chat_prompt([{"role": "user", "content": u1}, {"role": "assistant", "content": expected[0]},
                                  {"role": "user", "content": u2}, {"role": "assistant", "content": expected[1]},
                                  {"role": "user", "content": u3}])
    assert direct_reply(tiny.model, tiny.tok, carried) != expected[2]


def test_hf_folder_with_system_prompt(tiny):
    """The exported Hugging Face folder (tokenizer from the folder) and --system: the system turn leads every
    prompt; /quit ends before the lines after it."""
    lines = ["def main(", "import os"]
    r = run_chat(tiny.hf, "--max_new_tokens", str(NEW), "--system", "You write Python.",
                 stdin="\n".join(lines + ["/quit", "never answered"]) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == transcript(expected_replies(tiny.model, tiny.tok, lines, system="You write Python."))
    assert "ChatML" in r.stderr and r.stderr.count("tokens/s") == 2


def test_tokenizer_chat_template_is_used(tiny):
    """A tokenizer with a chat_template: prompts are rendered with it (add_generation_prompt) and its end-of-turn
    marker (what it writes after an assistant message) becomes a stop string; ChatML prompts would give other
    replies."""
    tok = load_tokenizer(tiny.templated)
    assert tok.chat_template == TEMPLATE

    def render(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = ["Hello there, who are you?", "Please write a function that adds numbers."]
    r = run_chat(tiny.templated, "--max_new_tokens", str(NEW), stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    expected = expected_replies(tiny.model, tok, lines, render=render, stops=("<<end>>",))
    assert r.stdout == transcript(expected)
    assert "prompt format: the tokenizer's chat template, a reply ends at '<<end>>'" in r.stderr
    assert expected != expected_replies(tiny.model, tiny.tok, lines)  # ChatML: other prompts, other replies


def test_missing_checkpoint_is_one_line_error(tmp_path):
    """A model path that does not exist: exit 1, one line naming it and both kinds of model the script takes,
    answered before torch is imported."""
    for missing in (tmp_path / "nope.pt", tmp_path / "no-hf-folder"):
        r = run_chat(str(missing), stdin="hello\n")
        assert r.returncode == 1 and not r.stdout
        assert r.stderr.strip().splitlines() == [
            f"error: model {missing} does not exist; pass a composer checkpoint (a .pt file, a sharded checkpoint "
            "folder or s3://...) or a Hugging Face folder written by scripts/convert_composer_to_hf.py"]


def test_other_model_config_and_bad_tokenizer_are_one_line_errors(tiny, tmp_path, capsys, monkeypatch):
    """A --model_config the checkpoint was not trained with, a --tokenizer path that does not exist, sampling
    options that do not go together: exit 1, one line with the fix, no traceback."""
    script = load_script()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    other = tmp_path / "other.yaml"
    other.write_text("model: {d_model: 128, n_heads: 4, n_layers: 2, max_seq_len: 256, vocab_size: 4096}\n")
    cases = [(["--model_config", str(other)], "expects (4096, 128); the weights were made with a different model "
                                              "config: pass the config of the run that wrote them (--model_config"),
             (["--tokenizer", str(tmp_path / "no-tok")], f"tokenizer path {tmp_path / 'no-tok'} does not exist"),
             (["--top_k", "5"], "set a temperature > 0")]
    for extra, fix in cases:
        assert script.main([tiny.ckpt, *extra]) == 1
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert not out.out and len(lines) == 1 and lines[0].startswith("error: ") and fix in lines[0], out.err


def test_history_trimmed_from_the_oldest_turns(tiny, capsys, monkeypatch):
    """A conversation that outgrows max_seq_len - max_new_tokens: the oldest exchange is dropped (stderr says so)
    and the reply is the one to the trimmed conversation; a message too long on its own is refused with a note,
    the conversation is kept as it was and the chat goes on. (--max_seq_len 160 lowers this ALiBi model's 256.)"""
    script = load_script()
    limit, n = 160, 16  # room for prompts: 144 tokens
    lines = ["Tell me about dataclasses in Python and their fields.", "And what about default values for them?",
             "Show an example with a list field please."]
    too_long = "word " * 200
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines + [too_long, "Thanks!"]) + "\n"))
    assert script.main([tiny.ckpt, "--max_new_tokens", str(n), "--max_seq_len", str(limit)]) == 0
    out = capsys.readouterr()
    assert out.err.count("history trimmed: dropped the 1 oldest exchange(s)") == 2  # at turn 3 and at "Thanks!"
    assert "error: this message makes a prompt of" in out.err and "lower --max_new_tokens" in out.err

    # the same conversation turn by turn, trimming the way the script is documented to
    tok, history, replies = tiny.tok, [], []
    for line in lines + ["Thanks!"]:
        history.append({"role": "user", "content": line})
        while len(tok(format_chat_prompt(history), add_special_tokens=False)["input_ids"]) > limit - n:
            del history[:2]
        reply = direct_reply(tiny.model, tok, format_chat_prompt(history), n=n)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert [m["content"] for m in history[::2]] == lines[2:] + ["Thanks!"]  # turn 1 dropped, turn 3 kept
    assert out.out == transcript(replies)


class Recorder:
    """A stdout stand-in that keeps every write and counts flushes."""

    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        self.flushes += 1


def test_reply_is_streamed_piece_by_piece(tiny):
    """The reply reaches the terminal in several flushed pieces while it is generated, not in one write."""
    script = load_script()
    args = script.parse_args([tiny.ckpt, "--max_new_tokens", str(NEW)])
    out = Recorder()
    assert script.chat(tiny.model, tiny.tok, args, SamplingConfig(max_new_tokens=NEW), ["def main("], out=out,
                       err=io.StringIO()) == 0
    pieces = [w for w in out.writes[1:-1] if w]  # between "assistant> " and the closing newline
    assert out.writes[0] == "assistant> " and out.writes[-1] == "\n"
    assert len(pieces) > 3 and out.flushes >= len(pieces)
    assert "".join(pieces) == direct_reply(tiny.model, tiny.tok, format_chat_prompt(
        [{"role": "user", "content": "def main("}]))


def test_incremental_decoding_holds_back_partial_characters_and_stop_strings(tok):
    """Fed token by token, the printed pieces add up to the text before the stop string: no broken multi-byte
    character and no piece of '<|im_end|>' is ever printed."""
    script = load_script()
    text = "Grüße, 日本語 and émoji 🙂 done"
    reply = script.ReplyText(tok, ["<|im_end|>"])
    pieces = [reply.add(t) for t in tok(text + "<|im_end|>\nmore", add_special_tokens=False)["input_ids"]
              if reply.stopped_at is None]
    pieces.append(reply.finish())
    assert "".join(pieces) == text and reply.text == text and reply.stopped_at == "<|im_end|>"
    assert not any("\ufffd" in p or "<" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it did come out in pieces
    # a tail that only looks like the start of a stop string is printed once the next token rules it out
    reply = script.ReplyText(tok, ["<|im_end|>"])
    shown = "".join(reply.add(t) for t in tok("a <|im_x", add_special_tokens=False)["input_ids"]) + reply.finish()
    assert shown == "a <|im_x" and reply.stopped_at is None


def test_stop_string_and_seeded_sampling(tiny, capsys, monkeypatch):
    """--stop ends a reply at that text (the greedy reply is cut just before it); --seed makes a sampled chat
    repeatable."""
    script = load_script()
    full = direct_reply(tiny.model, tiny.tok, format_chat_prompt([{"role": "user", "content": "def main("}]))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0

    def chat(*extra):
        monkeypatch.setattr(sys, "stdin", io.StringIO("def main(\nimport os\n"))
        assert script.main([tiny.ckpt, "--max_new_tokens", str(NEW), *extra]) == 0
        return capsys.readouterr()
    out = chat("--stop", stop)
    assert out.out.startswith(f"assistant> {full[:full.index(stop)]}\n")
    assert f"ended by {stop!r}" in out.err
    sampled = chat("--temperature", "1.0", "--top_k", "50", "--seed", "3").out
    assert sampled == chat("--temperature", "1.0", "--top_k", "50", "--seed", "3").out
    assert sampled != chat().out
