"""A run folder holds its tokenizer as files that transformers' AutoTokenizer loads with no custom
code, encoding and decoding exactly as the run did."""

import pytest
from transformers import AutoTokenizer

from dynamoe.config import load_config
from dynamoe.data.datasets import char_tokenizer
from dynamoe.data.sources import DataError
from dynamoe.data.tokenizer_files import save_tokenizer
from dynamoe.training.trainer import train

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\tSpeak, speak.  "


@pytest.mark.parametrize("reserve_special", [False, True])
def test_the_character_tokenizer_round_trips_through_autotokenizer(tmp_path, reserve_special):
    ours = char_tokenizer(TEXT, reserve_special=reserve_special)
    save_tokenizer(ours, tmp_path / "tok")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(theirs) == ours.vocab_size
    sample = TEXT[::-1] + TEXT
    assert theirs.encode(sample, add_special_tokens=False) == ours.encode(sample)
    assert theirs.decode(ours.encode(sample)) == sample
    if reserve_special:  # unknown characters map to <unk> (1), padding is 0
        assert theirs.encode("Z~", add_special_tokens=False) == ours.encode("Z~") == [1, 1]
        assert theirs.pad_token_id == 0


def test_a_run_folder_keeps_its_tokenizer(tmp_path):
    cfg = load_config("debug_tiny", ["train.steps=1", "train.eval_every=0", "train.warmup_steps=1"])
    train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert len(tok) == 65 and tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


def test_an_unwritable_tokenizer_folder_is_a_named_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="could not be written to .*fix: choose a writable folder"):
        save_tokenizer(char_tokenizer(TEXT, reserve_special=False), blocker / "tok")
    assert not (blocker / "tok.partial").exists()
