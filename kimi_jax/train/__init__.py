"""Training the embedded tiny chat model: a generated Kimi-format corpus (`corpus`), the MuonClip
optimizer with QK-Clip (`muonclip`), the training loop and block-fp8 export (`trainer`), and the
held-out tool-use evaluation (`evaluate`). `scripts/train_tiny.py` (`make train-tiny`) runs it all."""
