"""Chat with a trained MPT model in the terminal: type a message, the reply is printed while it is generated.

    python scripts/chat.py runs/chat-ft/checkpoints/latest-rank0.pt            # a composer checkpoint
    python scripts/chat.py CKPT.pt --model_config yamls/tiny-cpu.yaml --tokenizer bundled   # records no config
    python scripts/chat.py hf/mpt-chat                                         # a folder from convert_composer_to_hf.py
    python scripts/chat.py hf/mpt-chat --system "Answer in one sentence." --temperature 0.7 --top_p 0.9 --seed 1
    printf 'Hi!\\nAnd then?\\n/reset\\nWho are you?\\n' | python scripts/chat.py hf/mpt-chat   # turns from a pipe

The model: a composer checkpoint (.pt file, sharded folder with .metadata, or s3://...; its model config and
tokenizer are read from the checkpoint or the config.yaml of its run, else give --model_config / --tokenizer), or
a Hugging Face MPT folder written by scripts/convert_composer_to_hf.py (config.json, weights, tokenizer files).

Prompt format: the tokenizer's own chat template when it has one (tokenizer.chat_template); otherwise ChatML, the
format llmfoundry/data/finetune.py trains chat data in (<|im_start|>role\\ntext<|im_end|>). The whole conversation
is sent each turn; when it no longer fits in the model's max_seq_len minus --max_new_tokens, the oldest exchanges
are dropped (a note on stderr says so). A reply ends at the end-of-text token, at the end-of-turn marker
(<|im_end|>, or the one the chat template writes after an assistant turn), at any --stop string, or after
--max_new_tokens tokens.

Input: one message per line from stdin (a terminal shows a "you> " prompt; a pipe or file works the same).
Commands: /reset forgets the conversation (the system prompt stays), /system TEXT sets the system prompt
(/system alone removes it), /quit ends; end of input (Ctrl-D) ends too. Start a message with // to send a line
that begins with /. Ctrl-C during a reply cuts it short.

Output: each reply on stdout after "assistant> "; after it, on stderr, a line with its token count and speed.
Exit status: 0 at /quit or end of input, 1 a model, checkpoint or tokenizer problem (one message on stderr),
2 a bad command line, 130 Ctrl-C at the prompt.
"""
import argparse
import os
import sys
import time

COMMANDS = "/reset, /system TEXT, /quit"
CHATML_END = "<|im_end|>"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; answers --help here, before torch or transformers are imported."""
    p = argparse.ArgumentParser(usage="python scripts/chat.py MODEL [--system TEXT] [--temperature T] [options]",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="composer checkpoint (.pt, sharded folder, s3://...) or Hugging Face MPT folder")
    p.add_argument("--system", default=None, help="system prompt for the conversation (default: none)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="longest reply, in tokens (default: 256, or half the model's max_seq_len if less)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample from the top-p probability mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed gives the same chat")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also end a reply at TEXT (repeatable; \\n is a newline)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, 'bundled' or hub name "
                                                     "(default: the model's own)")
    p.add_argument("--model_config", default=None, help="training YAML, for a checkpoint that records no config")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="run with this max_seq_len instead of the model's (ALiBi models can go past their training "
                        "length)")
    p.add_argument("--attn_impl", default=None, choices=["torch", "flex", "flash", "triton"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU")
    return p.parse_args(argv)


def unescape(text: str) -> str:
    """``\\n`` typed on the command line as a newline (so ``--stop '\\n\\n'`` stops at a blank line)."""
    return text.replace("\\n", "\n")


def check_model_path(path: str) -> None:
    """Refuse a local model path that does not exist, naming both kinds of model this script reads."""
    if "://" in path and not path.startswith("file://"):
        return  # remote: the checkpoint loader says what is wrong with it
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(local):
        raise FileNotFoundError(f"model {path} does not exist; pass a composer checkpoint (a .pt file, a sharded "
                                "checkpoint folder or s3://...) or a Hugging Face folder written by "
                                "scripts/convert_composer_to_hf.py")


def load_chat_model(args):
    """``(model, tokenizer, device)`` for ``args.model``, loaded as scripts/generate.py loads it."""
    from llmfoundry.generate import load_for_generation

    check_model_path(args.model)
    return load_for_generation(args.model, device=args.device, dtype=args.dtype, attn_impl=args.attn_impl,
                               max_seq_len=args.max_seq_len, tokenizer=args.tokenizer,
                               model_config=args.model_config)


# ----------------------------------------------------------------------------------------------------------------
# Prompt format

def template_end_of_turn(tokenizer):
    """The marker the tokenizer's chat template writes after an assistant message (e.g. ``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``): the first word after the message in a rendered sample conversation, or None."""
    mark = "\x00reply\x00"
    sample = [{"role": "user", "content": "question"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(sample, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the sample: no marker known
        return None
    if not isinstance(text, str) or mark not in text:
        return None
    words = text[text.rindex(mark) + len(mark):].split()
    return words[0] if words else None


class ChatFormat:
    """How a conversation becomes the prompt text: the tokenizer's chat template, or our ChatML."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        if self.uses_template:
            self.end_of_turn = template_end_of_turn(tokenizer)
            self.name = "the tokenizer's chat template"
        else:
            self.end_of_turn = CHATML_END
            self.name = "ChatML (llmfoundry/data/finetune.py)"

    def prompt(self, messages: list) -> str:
        """The text to generate the next assistant message from (it ends where the reply begins)."""
        if not self.uses_template:
            from llmfoundry.data.finetune import format_chat_prompt
            return format_chat_prompt(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
            raise ValueError(f"the tokenizer's chat template cannot render this conversation ({type(e).__name__}: "
                             f"{e}); if it refuses a system message, drop --system or use /system with no text"
                             ) from None

    def encode(self, messages: list) -> list:
        """The prompt's token ids (no special tokens added: the format writes its own)."""
        return list(self.tokenizer(self.prompt(messages), add_special_tokens=False)["input_ids"])


def stop_ids_for(tokenizer, stop_strings: list) -> list:
    """Token ids that end a reply: EOS, and each stop string that is one token of the tokenizer (a special token
    such as ``<|im_end|>`` in a chat tokenizer is then caught even though decoding hides it)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for s in stop_strings:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def fit_history(fmt: ChatFormat, system, turns: list, budget: int):
    """``(prompt ids, turns kept, exchanges dropped)``: the conversation's prompt after dropping its oldest
    user/assistant exchanges until it is at most ``budget`` tokens (``turns`` itself is not changed). Refuses
    (ValueError) a last message that does not fit even alone."""
    head = [{"role": "system", "content": system}] if system else []
    kept = list(turns)
    while True:
        ids = fmt.encode(head + kept)
        if len(ids) <= budget:
            return ids, kept, (len(turns) - len(kept)) // 2
        if len(kept) <= 1:
            raise ValueError(f"this message makes a prompt of {len(ids)} tokens, but the model has room for {budget} "
                             f"(max_seq_len minus --max_new_tokens); send a shorter message, lower --max_new_tokens"
                             f"{', shorten the system prompt' if system else ''} or raise --max_seq_len (ALiBi)")
        kept = kept[2:]


# ----------------------------------------------------------------------------------------------------------------
# Streaming a reply

class ReplyText:
    """A reply's text as its tokens arrive. ``add`` returns the text that can be printed now: the whole running
    token list is decoded and the new suffix is given out, except an unfinished multi-byte character and a tail
    that could still become a stop string (held back until the next token decides)."""

    def __init__(self, tokenizer, stop_strings: list):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list = []
        self.shown = ""
        self.text = ""
        self.stopped_at = None  # the stop string that ended the reply

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.shown) or not upto.startswith(self.shown):
            return ""
        new, self.shown = upto[len(self.shown):], upto
        return new

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def add(self, token_id: int) -> str:
        """Take one new token; the text to print now ('' when none)."""
        self.ids.append(token_id)
        text = self._decode()
        hits = [(text.find(s), s) for s in self.stop_strings if s in text]
        if hits:
            at, self.stopped_at = min(hits)
            self.text = text[:at]
            return self._release(self.text)
        self.text = text
        ready = text[:len(text) - self._held_back(text)]
        while ready.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            ready = ready[:-1]
        return self._release(ready)

    def finish(self) -> str:
        """The reply has ended: the text still held back."""
        return self._release(self.text)


def stream_reply(model, tokenizer, prompt_ids: list, sampling, stop_strings: list, stop_ids: list, generator,
                 out) -> tuple:
    """Generate one reply, writing it to ``out`` as it comes (flushed after each piece). Returns ``(reply text,
    new tokens, why it ended)``."""
    from llmfoundry.generate import stream_ids

    reply = ReplyText(tokenizer, stop_strings)
    reason = "max_new_tokens"
    count = 0
    tokens = stream_ids(model, prompt_ids, sampling, stop_ids=stop_ids, generator=generator)
    try:
        for token in tokens:
            count += 1
            if token in stop_ids:
                reason = "end of text" if token == tokenizer.eos_token_id else repr(tokenizer.decode([token]))
                break
            piece = reply.add(token)
            if piece:
                out.write(piece)
                out.flush()
            if reply.stopped_at is not None:
                reason = repr(reply.stopped_at)
                break
    except KeyboardInterrupt:
        reason = "Ctrl-C"
    finally:
        tokens.close()
    out.write(reply.finish())
    out.flush()
    return reply.text, count, reason


# ----------------------------------------------------------------------------------------------------------------
# The conversation

def user_lines(stdin, interactive: bool):
    """The user's lines, one at a time, until end of input; a terminal gets a "you> " prompt."""
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
            line = line.rstrip("\r\n")
        yield line


def chat(model, tokenizer, args, sampling, lines, out=None, err=None) -> int:
    """Run the conversation over ``lines`` (user messages and commands) with ``sampling`` (a ``SamplingConfig``),
    replies to ``out`` (default stdout), notes and stats to ``err`` (default stderr); 0 at /quit or end of input."""
    from llmfoundry.generate import make_generator, max_seq_len_of, model_device

    out, err = out or sys.stdout, err or sys.stderr
    limit = max_seq_len_of(model) or 2 ** 31
    budget = limit - sampling.max_new_tokens
    if budget < 1:
        raise ValueError(f"--max_new_tokens {sampling.max_new_tokens} leaves no room for the conversation in the "
                         f"model's max_seq_len={limit}; lower --max_new_tokens")
    fmt = ChatFormat(tokenizer)
    stop_strings = [s for s in [fmt.end_of_turn] + [unescape(s) for s in args.stop] if s]
    stop_ids = stop_ids_for(tokenizer, stop_strings)
    generator = make_generator(args.seed, model_device(model))
    end = f", a reply ends at {fmt.end_of_turn!r}" if fmt.end_of_turn else ""
    print(f"chat: {args.model} (max_seq_len {limit}); prompt format: {fmt.name}{end}; commands: {COMMANDS}",
          file=err, flush=True)
    system, turns = args.system, []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            turns = []
            print("(conversation cleared)", file=err, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'removed'})", file=err, flush=True)
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}; commands: {COMMANDS} (start with // to send a message that "
                  "begins with /)", file=err, flush=True)
            continue
        try:
            prompt_ids, turns, dropped = fit_history(fmt, system, turns + [{"role": "user", "content": text}],
                                                     budget)
        except ValueError as e:  # the message alone is too long: the conversation stays as it was
            print(f"error: {e}", file=err, flush=True)
            continue
        if dropped:
            print(f"(history trimmed: dropped the {dropped} oldest exchange(s) to fit max_seq_len {limit} minus "
                  f"--max_new_tokens {sampling.max_new_tokens})", file=err, flush=True)
        out.write("assistant> ")
        out.flush()
        t0 = time.perf_counter()
        reply, n, reason = stream_reply(model, tokenizer, prompt_ids, sampling, stop_strings, stop_ids, generator,
                                        out)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        out.write("\n")
        out.flush()
        turns.append({"role": "assistant", "content": reply})
        print(f"({n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s; prompt {len(prompt_ids)} tokens; "
              f"ended by {reason})", file=err, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_model_path(args.model)  # before importing torch: a mistyped path is answered at once
        from llmfoundry.generate import SamplingConfig, max_seq_len_of
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        given = args.max_new_tokens
        SamplingConfig(max_new_tokens=1 if given is None else given, **options)  # bad options: refused before loading
        model, tokenizer, _ = load_chat_model(args)
        limit = max_seq_len_of(model)
        n = given if given is not None else (min(256, limit // 2) if limit else 256)
        sampling = SamplingConfig(max_new_tokens=n, **options)
        return chat(model, tokenizer, args, sampling, user_lines(sys.stdin, sys.stdin.isatty()))
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
