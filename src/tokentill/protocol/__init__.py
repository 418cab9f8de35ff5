"""The OpenAI wire format: request validation and response shapes. No framework imports."""
