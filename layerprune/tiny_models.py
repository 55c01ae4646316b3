"""Tiny random-init models in the layouts we support, for exactness tests (never for quality)."""
import torch
from transformers import AutoModelForCausalLM, FalconConfig, Gemma3TextConfig, LlamaConfig

VOCAB = 128


def tiny_llama(num_layers=6, seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return build(config, seed)


def tiny_gemma3(num_layers=6, seed=0):
    # sliding_window smaller than the test sequences, so the mix of sliding and full attention matters
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        max_position_embeddings=256,
    )
    return build(config, seed)


def tiny_falcon11b(num_layers=6, seed=0):
    # Falcon-11B's layout: new decoder architecture, parallel attention + MLP, one input_layernorm per layer
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, num_ln_in_parallel_attn=1,
        bias=False, alibi=False,
    )
    return build(config, seed)


def build(config, seed):
    """A random-init model of any config, the same for the same seed (the tests' other layouts start here)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    return model.eval()


ALL_LAYOUTS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "falcon": tiny_falcon11b}


def word_tokenizer(vocab_size: int, bos: bool = False):
    """A word-level tokenizer: word `w<i>` is token i (3 <= i < vocab_size), so random token ids are a text;
    [UNK] is 0, </s> (EOS) 1 and <s> 2, which it puts in front of every text when `bos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", bos_token="<s>")
