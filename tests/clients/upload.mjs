// Uploads a file with tus-js-client (its Node.js build), as tests/tests/tus_clients.rs asks:
//
//   node upload.mjs ENDPOINT KEY FILE CHUNK_SIZE [OPTIONS_JSON]
//
// OPTIONS_JSON (all optional): {"parallelUploads": N, "uploadDataDuringCreation": true,
// "uploadUrl": "<an upload URL to resume>", "abortAfter": BYTES (abort the upload once at
// least that many bytes were acknowledged, without terminating it), "retryDelays": [MS, ...]
// (none by default)}.
//
// Prints one JSON line on stdout: {"outcome": "success" | "aborted", "url": the upload URL,
// "offset": bytes acknowledged, "uploadId": the Upgate-Upload-Id header of the last answer that
// carried one (null if none), "statuses": every HTTP status seen, in order}. On error, prints
// the error (with the request and response tus-js-client saw) on stderr and exits 1.
import { readFileSync } from 'node:fs'
import { basename } from 'node:path'
import * as tus from 'tus-js-client'

const [endpoint, key, file, chunkSizeText, optionsText] = process.argv.slice(2)
if (!endpoint || !key || !file || !chunkSizeText) {
  console.error('usage: node upload.mjs ENDPOINT KEY FILE CHUNK_SIZE [OPTIONS_JSON]')
  process.exit(2)
}
const options = optionsText ? JSON.parse(optionsText) : {}
const chunkSize = Number(chunkSizeText)
// A Buffer source: tus-js-client slices it for chunks and for parallel parts alike.
const bytes = readFileSync(file)

let uploadId = null
const statuses = []
let acknowledged = 0
let upload = null

const finish = (outcome) => {
  console.log(JSON.stringify({ outcome, url: upload.url, offset: acknowledged, uploadId, statuses }))
}

upload = new tus.Upload(bytes, {
  endpoint,
  uploadUrl: options.uploadUrl ?? null,
  headers: { Authorization: `Bearer ${key}` },
  chunkSize,
  parallelUploads: options.parallelUploads ?? 1,
  uploadDataDuringCreation: options.uploadDataDuringCreation ?? false,
  metadata: { filename: basename(file), filetype: 'application/octet-stream' },
  // By default fail on the first error: the test wants to see the server's answer, not a
  // retry of it.
  retryDelays: options.retryDelays ?? [],
  // No fingerprint store: the test resumes with `uploadUrl` only.
  storeFingerprintForResuming: false,
  onAfterResponse(_request, response) {
    statuses.push(response.getStatus())
    const id = response.getHeader('Upgate-Upload-Id')
    if (id) uploadId = id
  },
  onChunkComplete(_chunkSize, bytesAccepted) {
    acknowledged = bytesAccepted
    if (options.abortAfter != null && bytesAccepted >= options.abortAfter && bytesAccepted < bytes.length) {
      upload.abort(false).then(() => {
        finish('aborted')
        process.exit(0)
      })
    }
  },
  onSuccess() {
    acknowledged = bytes.length
    finish('success')
  },
  onError(error) {
    console.error(`tus-js-client: ${error}`)
    if (error.originalRequest) {
      console.error(`request: ${error.originalRequest.getMethod()} ${error.originalRequest.getURL()}`)
    }
    if (error.originalResponse) {
      const response = error.originalResponse
      console.error(`response: ${response.getStatus()} ${JSON.stringify(response.getBody())}`)
    }
    console.error(`statuses so far: ${JSON.stringify(statuses)}`)
    process.exit(1)
  },
})
upload.start()
