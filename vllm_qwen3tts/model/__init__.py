"""Model pieces in plain PyTorch: prompt layout, talker embeddings and head, the code predictor
and its kernels, sampling, the text tokenizer. They import only `base`."""
