"""attncc inside torch programs: custom ops for torch.compile, and the Hugging Face transformers hook.

``attncc.integrations.transformers`` imports ``transformers`` only when imported itself.
"""
