# One image for the web process and the embedding worker.
# torch==2.13.0 from requirements.txt is the CUDA build on Linux x86_64, so
# the same image runs the worker on a GPU (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
RUN DATABASE_URL=postgres://unused/unused REDIS_URL=redis://unused:6379/0 \
    python manage.py collectstatic --noinput

# /models is the models volume's mount point (docker-compose.yml): a new
# named volume takes the owner of the image's directory, so app can write
# the models semantic_finetune trains.
RUN useradd --create-home app && mkdir /models && chown app:app /models
USER app

EXPOSE 8000
CMD ["gunicorn", "project.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2"]
