// Drives headless Chromium (Debian's /usr/bin/chromium, through /usr/bin/chromedriver and
// selenium-webdriver) to PAGE_URL (tests/clients/page.html served from another origin than the
// daemon's) and waits for the page to report its upload in document.title:
//
//   node browser.mjs PAGE_URL [TIMEOUT_MS]
//
// Prints the page's JSON report ({url, uploadId, statuses}) on stdout and exits 0, or prints
// the page's error, its console and the title on stderr and exits 1.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Builder, logging } from 'selenium-webdriver'
import chrome from 'selenium-webdriver/chrome.js'

const [pageUrl, timeoutText] = process.argv.slice(2)
if (!pageUrl) {
  console.error('usage: node browser.mjs PAGE_URL [TIMEOUT_MS]')
  process.exit(2)
}
const timeout = Number(timeoutText ?? 30000)
const profile = mkdtempSync(join(tmpdir(), 'upgate-chromium-'))

const options = new chrome.Options()
options.setChromeBinaryPath('/usr/bin/chromium')
options.addArguments(
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-dev-shm-usage',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  `--user-data-dir=${profile}`,
)
const prefs = new logging.Preferences()
prefs.setLevel(logging.Type.BROWSER, logging.Level.ALL)
options.setLoggingPrefs(prefs)
// The driver is given: selenium-webdriver then never runs Selenium Manager (no download).
const service = new chrome.ServiceBuilder('/usr/bin/chromedriver')

let driver
let status = 1
try {
  driver = await new Builder().forBrowser('chrome').setChromeOptions(options).setChromeService(service).build()
  await driver.get(pageUrl)
  let title = ''
  await driver
    .wait(async () => {
      title = await driver.getTitle()
      return title.startsWith('done ') || title.startsWith('error ')
    }, timeout)
    .catch(() => {})
  if (title.startsWith('done ')) {
    console.log(title.slice('done '.length))
    status = 0
  } else {
    console.error(`page: ${title || '(no title)'}`)
    const entries = await driver.manage().logs().get(logging.Type.BROWSER).catch(() => [])
    for (const entry of entries) console.error(`console: ${entry.level.name} ${entry.message}`)
  }
} catch (error) {
  console.error(`browser: ${error.stack ?? error}`)
} finally {
  if (driver) await driver.quit().catch(() => {})
  rmSync(profile, { recursive: true, force: true })
}
process.exit(status)
