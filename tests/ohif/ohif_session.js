// One OHIF session in headless Chromium, as an annotator works: study list -> MONAI Label mode -> connect the
// MONAI Label panel -> Point Prompts -> one click on a structure -> Run. tests/test_ohif.py starts it and checks
// what it wrote.
//
// usage: node ohif_session.js <config.json>
//   config: {server, patient, label, world: [x, y, z] (patient LPS mm, the click), out: folder, chromium}
// writes into `out`: result.json (one entry per step, console errors, failed requests, the labelmap OHIF shows)
// and PNG screenshots. Exits 0 when result.json was written, even when a step failed: the test reads the steps.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const STEP_TIMEOUT_MS = 60000;
// The first click on a series fetches it from the PACS and runs the image encoder: tens of seconds on 2 CPU cores.
const INFER_TIMEOUT_MS = 240000;

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const out = config.out;
  const result = { steps: {}, console: [], pageErrors: [], failedRequests: [], httpErrors: [], infer: null };
  const write = () => fs.writeFileSync(path.join(out, 'result.json'), JSON.stringify(result, null, 1));

  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    // --no-sandbox: CI runs as root. No GPU here: WebGL (cornerstone3D renders volumes with it) runs on
    // SwiftShader, which Chromium only offers for WebGL when told to.
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
  });
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') result.console.push(`${m.type()}: ${m.text().slice(0, 500)}`);
  });
  page.on('pageerror', (e) => result.pageErrors.push(e.stack || e.message));
  page.on('requestfailed', (r) => result.failedRequests.push(`${r.url()} ${r.failure().errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) result.httpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
  });
  // Nothing leaves the machine: OHIF's index.html asks fonts.googleapis.com for a font.
  await page.route((u) => !u.href.startsWith(config.server), (route) => route.abort());
  await page.addInitScript(() => {
    window.addEventListener('unhandledrejection', (e) =>
      console.error('unhandled rejection: ' + (e.reason && (e.reason.stack || e.reason))));
  });

  const shot = async (name, options = {}) => {
    const file = path.join(out, name);
    await page.screenshot({ path: file, ...options });
    return file;
  };
  const step = async (name, body) => {
    const started = Date.now();
    try {
      result.steps[name] = { ok: true, ...(await body()), seconds: (Date.now() - started) / 1000 };
    } catch (error) {
      result.steps[name] = { ok: false, error: String(error.stack || error), seconds: (Date.now() - started) / 1000 };
      await shot(`failed_${name}.png`).catch(() => {});
      throw error;
    } finally {
      write();
    }
  };

  try {
    await step('study_list', async () => {
      await page.goto(`${config.server}/ohif/`);
      await page.getByText(config.patient, { exact: true }).first().waitFor();
      await page.getByRole('button', { name: 'Confirm and Hide' }).click(); // the "investigational use" banner
      const patients = await page.getByText(/^MAIS, /).allInnerTexts();
      return { patients: [...new Set(patients)], screenshot: await shot('01_study_list.png') };
    });

    await step('open_viewer', async () => {
      await page.getByText(config.patient, { exact: true }).first().click();
      const modes = await page.locator('button').allInnerTexts();
      await page.getByRole('button', { name: 'MONAI Label', exact: true }).click();
      // loaded = the axial viewport of the MPR layout holds the volume and rendered it
      await page.waitForFunction(() => {
        const vp = window.services?.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
        return vp && vp.getImageData() && vp.getImageData().dimensions;
      });
      await page.waitForTimeout(1000);
      const viewer = await page.evaluate(() => {
        const { viewportGridService, displaySetService, cornerstoneViewportService } = window.services;
        const { viewports, activeViewportId } = viewportGridService.getState();
        const displaySet = displaySetService.getDisplaySetByUID(viewports.get(activeViewportId).displaySetInstanceUIDs[0]);
        const vp = cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
        return {
          seriesInstanceUID: displaySet.SeriesInstanceUID,
          modality: displaySet.Modality,
          frames: displaySet.numImageFrames,
          dimensions: Array.from(vp.getImageData().dimensions),
        };
      });
      return { modes: modes.filter((m) => m), url: page.url(), ...viewer, screenshot: await shot('02_viewer.png') };
    });

    await step('connect_panel', async () => {
      await page.fill('#monailabelServerURL', `${config.server}/`);
      await page.locator('.settingsTable button.actionButton').click();
      await page.locator('label.tab-label', { hasText: 'Point Prompts' }).waitFor({ timeout: 30000 });
      const models = await page.locator('.modelSelector select option').allInnerTexts();
      return { models: [...new Set(models.map((m) => m.trim()))], screenshot: await shot('03_connected.png') };
    });

    await step('point_prompt', async () => {
      await page.locator('label.tab-label', { hasText: 'Point Prompts' }).click();
      await page.locator('tr.clickable-row', { hasText: new RegExp(`^${config.label}$`) }).click();
      // scroll the axial viewport to the slice through the click, then click where that point is drawn
      const target = await page.evaluate((world) => {
        const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
        const camera = vp.getCamera();
        const n = camera.viewPlaneNormal;
        const d = [0, 1, 2].reduce((s, i) => s + (world[i] - camera.focalPoint[i]) * n[i], 0);
        vp.setCamera({
          focalPoint: camera.focalPoint.map((v, i) => v + d * n[i]),
          position: camera.position.map((v, i) => v + d * n[i]),
        });
        vp.render();
        const [x, y] = vp.worldToCanvas(world);
        const r = vp.canvas.getBoundingClientRect();
        return { x: r.left + x, y: r.top + y, viewport: { x: r.left, y: r.top, width: r.width, height: r.height } };
      }, config.world);
      await page.waitForTimeout(500);
      await page.mouse.click(target.x, target.y);
      await page.waitForTimeout(500);
      const before = await shot('04_clicked_viewport.png', { clip: target.viewport });
      const [response] = await Promise.all([
        page.waitForResponse((r) => r.url().includes('/infer/'), { timeout: INFER_TIMEOUT_MS }),
        page.getByTitle('Run PointPrompts').click(),
      ]);
      result.infer = { status: response.status(), url: response.url(), params: response.request().postData() };
      await page.getByText('Running Inference for Point Prompts - Successful').waitFor({ timeout: 30000 });
      await page.getByText('Running Inference for Point Prompts - Successful').waitFor({ state: 'hidden' });
      await page.waitForTimeout(500);
      const labelmap = await page.evaluate((label) => {
        const { segmentationService } = window.services;
        const volume = segmentationService.getLabelmapVolume('1');
        const data = volume.voxelManager.getCompleteScalarDataArray();
        const segmentation = segmentationService.getSegmentation('1');
        const segments = segmentation.segments || segmentation.config.segments;
        const index = Object.values(segments).find((s) => s && s.label === label).segmentIndex;
        const voxels = [];
        for (let i = 0; i < data.length; i++) if (data[i] === index) voxels.push(i);
        return {
          segmentIndex: index,
          dimensions: Array.from(volume.dimensions),
          origin: Array.from(volume.origin),
          spacing: Array.from(volume.spacing),
          direction: Array.from(volume.direction),
          voxels, // flat indices i + j * nx + k * nx * ny of the voxels painted with `label`
          otherVoxels: data.reduce((n, v) => n + (v !== 0 && v !== index ? 1 : 0), 0),
        };
      }, config.label);
      fs.writeFileSync(path.join(out, 'labelmap.json'), JSON.stringify(labelmap));
      return {
        click: [target.x, target.y],
        viewport: target.viewport,
        before,
        after: await shot('05_result_viewport.png', { clip: target.viewport }),
        screenshot: await shot('06_result.png'),
        segmentIndex: labelmap.segmentIndex,
        voxels: labelmap.voxels.length,
      };
    });

    await step('zoomed', async () => {
      // the picture for the docs: the axial viewport zoomed in on the click, the result on top
      await page.evaluate((world) => {
        const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
        const camera = vp.getCamera();
        const shift = [0, 1, 2].map((i) => world[i] - camera.focalPoint[i]);
        const n = camera.viewPlaneNormal;
        const along = [0, 1, 2].reduce((s, i) => s + shift[i] * n[i], 0);
        const inPlane = shift.map((v, i) => v - along * n[i]);
        vp.setCamera({
          focalPoint: camera.focalPoint.map((v, i) => v + inPlane[i]),
          position: camera.position.map((v, i) => v + inPlane[i]),
          parallelScale: camera.parallelScale / 2,
        });
        vp.render();
      }, config.world);
      await page.waitForTimeout(1000);
      return { screenshot: await shot('07_zoomed.png') };
    });
  } catch (error) {
    // recorded in its step; the remaining steps did not run
  } finally {
    write();
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
