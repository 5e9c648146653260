"""The allocator service: remote memory (rmalloc/rwrite/rread/rfree) on one node.

``service.py`` holds the endpoints, ``identity.py`` the node's persistent identity
(shared-memory prefix and handle key) that lets a restarted allocator reattach
its arena and keep honouring the handles it issued.
"""

from .service import AllocatorService

__all__ = ["AllocatorService"]
