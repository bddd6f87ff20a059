"""altjax: ALIGN and AltCLIP dual encoders in JAX/Flax NNX, numerically equal to transformers."""
from setuptools import find_packages, setup

setup(
    name="altjax",
    version="0.1.0",
    description="Contrastive image-text dual encoders (ALIGN, AltCLIP) in JAX/Flax NNX with PyTorch parity",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # convert/ (the thin command-line converters) installs as ``altjax_convert`` and configs/ (the
    # recipes ``altjax-train --config NAME`` reads) as ``altjax_configs``: top-level packages named
    # plainly ``convert`` or ``configs`` would collide in site-packages.
    packages=find_packages(include=["altjax", "altjax.*"]) + ["altjax_convert", "altjax_configs"],
    package_dir={"altjax_convert": "convert", "altjax_configs": "configs"},
    install_requires=[
        "jax>=0.8",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "ml_dtypes",
        # Progress bars of the commands and of model loading (altjax.console).
        "tqdm>=4.66",
        # Tokenizers for the processors (BERT WordPiece, XLM-R sentencepiece); transformers does not
        # need torch for them.
        "transformers>=5.0",
        # Hub ids wherever a model directory is taken (altjax.hub).
        "huggingface_hub>=1.0",
        # tf.Example records (altjax.data.example) without TensorFlow or tensorflow-datasets.
        "protobuf>=4.25",
        "tokenizers",
        "sentencepiece",
        # The embedded dataset and tfds input, without TensorFlow: ArrayRecord files read through
        # tfds data sources, TFRecords framed and checksummed in altjax.data.tfrecord.
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "google-crc32c>=1.5",
        # tfds 4.9.10 imports it when preparing a builder defined in a package, but declares it
        # only for Python < 3.9.
        "importlib_resources",
    ],
    extras_require={
        # notebooks/: plots, and a kernel to run them headless (``jupyter execute NOTEBOOK``).
        "notebooks": ["matplotlib>=3.8", "ipykernel>=6", "nbclient>=0.10", "nbformat>=5.10"],
        # The PyTorch reference and everything the test suite needs. torch is pinned to the CPU wheel
        # available on the project machines; an unpinned torch pulls several GB of CUDA packages.
        "test": [
            "torch==2.13.0",
            "transformers==5.23.0",
            "sentencepiece",
            "tokenizers",
            "pytest>=8",
            "pytest-xdist>=3.5",  # the README's test command runs on every core (-n auto)
            "safetensors>=0.4",  # the reference reader/writer altjax.model_io.safetensors_io is tested against
            # Real photos for the bit-exact preprocessing tests (shipped inside these packages).
            "scikit-learn",
            "scikit-image",
            # tests/test_notebooks.py executes notebooks/ (the "notebooks" extra).
            "matplotlib>=3.8",
            "ipykernel>=6",
            "nbclient>=0.10",
            "nbformat>=5.10",
        ],
    },
    entry_points={
        "console_scripts": [
            "altjax-convert = altjax_convert.cli:main",
            "altjax-train = altjax.train:main",
            "altjax-eval = altjax.evaluation.cli:eval_main",
            "altjax-embed = altjax.evaluation.cli:embed_main",
        ]
    },
)
