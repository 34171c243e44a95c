"""relay: a webhook relay on RabbitMQ."""

from relay.errors import Reject, RelayError, Retry

__all__ = ["Reject", "RelayError", "Retry", "__version__"]
__version__ = "0.1.0"
