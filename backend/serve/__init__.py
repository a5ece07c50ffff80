"""Serving a tuned model to people and programs who never see the studio: an
OpenAI-compatible HTTP API (``ftstudio serve``, and ``/v1`` on the studio's own
server), scoped share links with an embeddable chat page, and the ``vllm serve``
command line for GPU boxes. ``catalog`` names the models (the Chat tab's
specs), ``engine`` queues and runs generations, ``openai_api`` speaks the wire
format, ``credentials`` decides who may call it."""
