"""Attention kernels (Triton split-KV GQA decode) and their plain-PyTorch references.

Empty until the decode-kernel issue: the SDPA reference path lives in r4b_core/attention.py.
"""
