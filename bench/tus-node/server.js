// @tus/server with @tus/file-store, for bench/run.sh --tus. No authentication, no hashing, no
// record beyond @tus/file-store's own <id>.json next to the bytes (<id>).
//
//   node server.js PORT DIRECTORY [WORKERS]
//
// WORKERS > 1 (bench/run.sh uses 2, one per core, like the other servers) forks that many
// processes with node:cluster sharing the listening socket; the uploads' state is in the files,
// so any worker can serve any request. Prints "tus-node: listening on 127.0.0.1:PORT" once every
// worker listens.
import cluster from "node:cluster";
import http from "node:http";
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const port = Number(process.argv[2] ?? 18082);
const directory = process.argv[3] ?? "./data";
const workers = Number(process.argv[4] ?? 1);

function serve() {
    const tus = new Server({ path: "/files", datastore: new FileStore({ directory }) });
    const server = http.createServer((req, res) => tus.handle(req, res));
    // Keep connections open as long as the other servers do (the load test reuses them).
    server.keepAliveTimeout = 60_000;
    server.headersTimeout = 65_000;
    server.requestTimeout = 0; // the big upload may take longer than node's 300 s default
    server.listen(port, "127.0.0.1", () => {
        if (cluster.isWorker) process.send("listening");
        else console.log(`tus-node: listening on 127.0.0.1:${port}`);
    });
    // SIGTERM: stop accepting, finish the requests in flight, then exit.
    process.on("SIGTERM", () => server.close(() => process.exit(0)));
}

if (workers > 1 && cluster.isPrimary) {
    let ready = 0;
    let stopping = false;
    for (let i = 0; i < workers; i++) {
        cluster.fork().on("message", (msg) => {
            if (msg === "listening" && ++ready === workers) console.log(`tus-node: listening on 127.0.0.1:${port}`);
        });
    }
    cluster.on("exit", (worker, code) => {
        if (!stopping) console.error(`tus-node: worker ${worker.process.pid} exited (${code})`);
        if (Object.keys(cluster.workers).length === 0) process.exit(stopping ? 0 : 1);
    });
    process.on("SIGTERM", () => {
        stopping = true;
        for (const worker of Object.values(cluster.workers)) worker.process.kill("SIGTERM");
    });
} else {
    serve();
}
