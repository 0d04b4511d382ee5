FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fila ./fila
RUN pip install --no-cache-dir .
ENV FILA_HOST=0.0.0.0 FILA_PORT=8080
EXPOSE 8080
CMD ["fila", "serve"]
