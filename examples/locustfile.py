"""Load-test a mobiserve server with Locust.

    pip install "mobiserve[locust]"
    MOBISERVE_IMAGES=path/to/images locust -f examples/locustfile.py --host 127.0.0.1:50051

That opens Locust's web UI on http://localhost:8089. Without it:

    locust -f examples/locustfile.py --host 127.0.0.1:50051 --headless -u 16 -r 16 -t 60s --csv out

(figures in out_stats.csv); `--processes N` runs N load processes. MOBISERVE_IMAGES is a folder of
images in any format the server decodes; each user sends them in its own random order. Options of
this file: `--model NAME` (default: the server's default model), `--top-k K` (5), `--timeout S`
(30), `--stream N` (0: each user makes one Classify call at a time; N: one ClassifyStream of N
images at a time). See docs/load-testing.md.
"""

from typing import Any

from locust import events, task

from mobiserve.client.locust import ClassifierUser, images_folder

IMAGES = images_folder()  # $MOBISERVE_IMAGES, checked now: without it Locust stops with one line saying so


@events.init_command_line_parser.add_listener
def options(parser: Any) -> None:
    parser.add_argument("--model", default=None, help="model to call (default: the server's default)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per answer")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    parser.add_argument("--stream", type=int, default=0, help="images per ClassifyStream (0: Classify calls)")


class Classifier(ClassifierUser):
    images = IMAGES

    def on_start(self) -> None:
        chosen = self.environment.parsed_options  # also in each of --processes' workers
        self.model, self.top_k, self.timeout = chosen.model, chosen.top_k, chosen.timeout
        self.stream_length = chosen.stream
        super().on_start()

    @task
    def call(self) -> None:
        if self.stream_length:
            self.classify_stream()
        else:
            self.classify()
