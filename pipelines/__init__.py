"""instantrec batch and nearline steps. Each step is a plain function and a CLI command."""
