// One OHIF session in headless Chromium, as annotators work: study list -> MONAI Label mode -> connect the
// MONAI Label panel -> Point Prompts -> a first click on a structure -> Run -> corrective clicks, each with Run ->
// a second annotator (a browser context of their own) clicks on the same study -> save the label -> Active
// Learning: Update Model (then Stop Training) and Next Sample. tests/test_ohif.py starts it and checks what it wrote.
//
// usage: node ohif_session.js <config.json>
//   config: {server, patient, label, world: [x, y, z] (patient LPS mm, the first click), corrections (how many),
//            strategy (the Active Learning strategy to pick), out: folder, chromium}
// The corrective clicks are placed by the test, which compares each mask with the ground truth: after a Run the
// session writes labelmap_<n>.json (n = clicks so far) and waits for click_<n+1>.json: {label, world}.
// writes into `out`: result.json (one entry per step, console errors, failed requests, the requests the panel
// sent), the labelmaps OHIF showed and PNG screenshots. Exits 0 when result.json was written, even when a step
// failed: the test reads the steps.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const STEP_TIMEOUT_MS = 60000;
// The first click on a series fetches it from the PACS and runs the image encoder: tens of seconds on 2 CPU cores,
// minutes while other work shares them.
const INFER_TIMEOUT_MS = 300000;
// How long the session waits for the test to place the next click (it reads the labelmap and the ground truth)
const NEXT_CLICK_TIMEOUT_MS = 60000;

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const out = config.out;
  const result = { steps: {}, console: [], pageErrors: [], failedRequests: [], httpErrors: [], requests: {} };
  const write = () => fs.writeFileSync(path.join(out, 'result.json'), JSON.stringify(result, null, 1));

  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    // --no-sandbox: CI runs as root. No GPU here: WebGL (cornerstone3D renders volumes with it) runs on
    // SwiftShader, which Chromium only offers for WebGL when told to.
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
  });
  // one browser context per annotator: own cookies, storage and OHIF state, as two people on two machines
  const newAnnotator = async () => {
    const context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
    const page = await context.newPage();
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
    return page;
  };

  const shot = async (page, name, options = {}) => {
    const file = path.join(out, name);
    await page.screenshot({ path: file, ...options });
    return file;
  };
  let current = null; // the page a failed step's screenshot shows
  const step = async (name, page, body) => {
    const started = Date.now();
    current = page;
    try {
      result.steps[name] = { ok: true, ...(await body()), seconds: (Date.now() - started) / 1000 };
    } catch (error) {
      result.steps[name] = { ok: false, error: String(error.stack || error), seconds: (Date.now() - started) / 1000 };
      await shot(current, `failed_${name}.png`).catch(() => {});
      throw error;
    } finally {
      write();
    }
  };
  const request = (response) => ({
    status: response.status(),
    method: response.request().method(),
    url: response.url(),
    body: response.request().postData(),
  });

  // loaded = the axial viewport of the MPR layout holds the volume and rendered it
  const waitForVolume = async (page) => {
    await page.waitForFunction(() => {
      const vp = window.services?.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      return vp && vp.getImageData() && vp.getImageData().dimensions;
    });
    await page.waitForTimeout(1000);
  };
  const shownSeries = (page) =>
    page.evaluate(() => {
      const { viewportGridService, displaySetService, cornerstoneViewportService } = window.services;
      const { viewports, activeViewportId } = viewportGridService.getState();
      const displaySet = displaySetService.getDisplaySetByUID(viewports.get(activeViewportId).displaySetInstanceUIDs[0]);
      const vp = cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      return {
        studyInstanceUID: displaySet.StudyInstanceUID,
        seriesInstanceUID: displaySet.SeriesInstanceUID,
        modality: displaySet.Modality,
        frames: displaySet.numImageFrames,
        dimensions: Array.from(vp.getImageData().dimensions),
      };
    });

  const openStudyList = async (page) => {
    await page.goto(`${config.server}/ohif/`);
    await page.getByText(config.patient, { exact: true }).first().waitFor();
    await page.getByRole('button', { name: 'Confirm and Hide' }).click(); // the "investigational use" banner
  };
  const openViewer = async (page) => {
    await page.getByText(config.patient, { exact: true }).first().click();
    const modes = await page.locator('button').allInnerTexts();
    await page.getByRole('button', { name: 'MONAI Label', exact: true }).click();
    await waitForVolume(page);
    return modes.filter((m) => m);
  };
  const connect = async (page) => {
    await page.fill('#monailabelServerURL', `${config.server}/`);
    await page.locator('.settingsTable button.actionButton').click();
    await page.locator('label.tab-label', { hasText: 'Point Prompts' }).waitFor({ timeout: 30000 });
  };
  const tab = (page, name) => page.locator('div.tab', { has: page.locator('label.tab-label', { hasText: name }) });

  // scroll the axial viewport to the slice through `world`, then click where that point is drawn, with `label`
  // picked in Available Organ(s) ("background" = a negative click)
  const clickAt = async (page, label, world) => {
    await page.locator('tr.clickable-row', { hasText: new RegExp(`^${label}$`) }).click();
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
    }, world);
    await page.waitForTimeout(500);
    await page.mouse.click(target.x, target.y);
    await page.waitForTimeout(500);
    return target;
  };
  // Run in Point Prompts: the panel sends every click so far; answers the infer request it sent
  const run = async (page) => {
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.url().includes('/infer/'), { timeout: INFER_TIMEOUT_MS }),
      page.getByTitle('Run PointPrompts').click(),
    ]);
    await page.getByText('Running Inference for Point Prompts - Successful').waitFor({ timeout: 30000 });
    await page.getByText('Running Inference for Point Prompts - Successful').waitFor({ state: 'hidden' });
    await page.waitForTimeout(500);
    return request(response);
  };
  // OHIF's own labelmap (what the overlay shows), written to `file`
  const saveLabelmap = async (page, file) => {
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
    // written aside, then renamed: the test waits for the file and must never read half of it
    fs.writeFileSync(path.join(out, `${file}.tmp`), JSON.stringify(labelmap));
    fs.renameSync(path.join(out, `${file}.tmp`), path.join(out, file));
    return labelmap;
  };
  const waitForFile = async (file) => {
    const deadline = Date.now() + NEXT_CLICK_TIMEOUT_MS;
    while (!fs.existsSync(file)) {
      if (Date.now() > deadline) throw new Error(`the test did not place the next click: no ${file}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  };
  // the axial viewport zoomed in on `world`: the pictures for the docs
  const zoomOn = async (page, world) => {
    await page.evaluate((world) => {
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      const camera = vp.getCamera();
      const shift = [0, 1, 2].map((i) => world[i] - camera.focalPoint[i]);
      const n = camera.viewPlaneNormal;
      const along = [0, 1, 2].reduce((s, i) => s + shift[i] * n[i], 0);
      const inPlane = shift.map((v, i) => v - along * n[i]);
      vp.setCamera({
        focalPoint: camera.focalPoint.map((v, i) => v + along * n[i] + inPlane[i]),
        position: camera.position.map((v, i) => v + along * n[i] + inPlane[i]),
        parallelScale: camera.parallelScale / 2,
      });
      vp.render();
    }, world);
    await page.waitForTimeout(1000);
  };

  try {
    const page = await newAnnotator();
    await step('study_list', page, async () => {
      await openStudyList(page);
      const patients = await page.getByText(/^MAIS, /).allInnerTexts();
      return { patients: [...new Set(patients)], screenshot: await shot(page, '01_study_list.png') };
    });

    await step('open_viewer', page, async () => {
      const modes = await openViewer(page);
      return { modes, url: page.url(), ...(await shownSeries(page)), screenshot: await shot(page, '02_viewer.png') };
    });

    await step('connect_panel', page, async () => {
      await connect(page);
      const models = await page.locator('.modelSelector select option').allInnerTexts();
      return { models: [...new Set(models.map((m) => m.trim()))], screenshot: await shot(page, '03_connected.png') };
    });

    await step('point_prompt', page, async () => {
      await page.locator('label.tab-label', { hasText: 'Point Prompts' }).click();
      const target = await clickAt(page, config.label, config.world);
      const before = await shot(page, '04_clicked_viewport.png', { clip: target.viewport });
      const infer = await run(page);
      const labelmap = await saveLabelmap(page, 'labelmap_1.json');
      return {
        infer,
        click: [target.x, target.y],
        viewport: target.viewport,
        before,
        after: await shot(page, '05_result_viewport.png', { clip: target.viewport }),
        screenshot: await shot(page, '06_result.png'),
        voxels: labelmap.voxels.length,
      };
    });

    for (let n = 2; n <= config.corrections + 1; n++) {
      await step(`correction_${n}`, page, async () => {
        const click = await waitForFile(path.join(out, `click_${n}.json`));
        await clickAt(page, click.label, click.world);
        const infer = await run(page);
        const labelmap = await saveLabelmap(page, `labelmap_${n}.json`);
        return { click, infer, voxels: labelmap.voxels.length, screenshot: await shot(page, `07_correction_${n}.png`) };
      });
    }

    await step('zoomed', page, async () => {
      // the refined mask on the slice of the first click, with the clicks placed there
      await zoomOn(page, config.world);
      return { screenshot: await shot(page, '08_refined_zoomed.png') };
    });

    await step('second_annotator', page, async () => {
      // a second annotator opens the same study in a browser of their own and clicks where the first one
      // clicked first; OHIF sends no client id, so only their click history tells the two apart
      const other = await newAnnotator();
      current = other;
      await openStudyList(other);
      await openViewer(other);
      await connect(other);
      await other.locator('label.tab-label', { hasText: 'Point Prompts' }).click();
      await clickAt(other, config.label, config.world);
      const infer = await run(other);
      const labelmap = await saveLabelmap(other, 'labelmap_second_annotator.json');
      const screenshot = await shot(other, '09_second_annotator.png');
      await other.context().close();
      return { infer, url: other.url(), voxels: labelmap.voxels.length, screenshot };
    });

    await step('first_annotator_again', page, async () => {
      // the first annotator runs their clicks again after the second one worked on the image
      const infer = await run(page);
      const labelmap = await saveLabelmap(page, 'labelmap_first_again.json');
      return { infer, voxels: labelmap.voxels.length, screenshot: await shot(page, '10_first_annotator_again.png') };
    });

    await step('save_label', page, async () => {
      // The bundled panel has no button that saves (docs/OHIF.md): its MonaiLabelClient has save_label, which
      // nothing calls. This calls it on the panel's own client with OHIF's labelmap, as a save button would:
      // PUT /datastore/label?image=<SeriesInstanceUID> with label.bin, one uint8 per voxel. OHIF numbers its
      // segments its own way (lesion is 9, the app's lesion is 1), so each voxel gets the app's index of its
      // segment's label first: the app reads a label's values as its own label indices.
      const [response] = await Promise.all([
        page.waitForResponse((r) => r.url().includes('/datastore/label')),
        page.evaluate(async () => {
          const element = document.querySelector('.monaiLabelPanel');
          const key = Object.keys(element).find((k) => k.startsWith('__reactFiber$'));
          let fiber = element[key];
          while (fiber && !(fiber.stateNode && typeof fiber.stateNode.client === 'function')) fiber = fiber.return;
          const panel = fiber.stateNode;
          const { displaySet } = panel.getActiveViewportInfo();
          const appIndex = panel.state.info.data.models.mais.labels; // {name: index}
          const { segmentationService } = window.services;
          const segmentation = segmentationService.getSegmentation('1');
          const toApp = new Uint8Array(256);
          for (const s of Object.values(segmentation.segments || segmentation.config.segments)) {
            if (s && s.label in appIndex) toApp[s.segmentIndex] = appIndex[s.label];
          }
          const data = segmentationService.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();
          const label = Uint8Array.from(data, (v) => toApp[v]);
          await panel.client().save_label(displaySet.SeriesInstanceUID, new Blob([label]), {});
        }),
      ]);
      return { request: { ...request(response), body: undefined }, answer: await response.json() };
    });

    await step('train', page, async () => {
      const activeLearning = tab(page, 'Active Learning');
      await page.locator('label.tab-label', { hasText: 'Active Learning' }).click();
      const [started] = await Promise.all([
        page.waitForResponse((r) => r.url().endsWith('/train/') && r.request().method() === 'POST'),
        activeLearning.getByRole('button', { name: 'Update Model' }).click(),
      ]);
      await page.getByText('Model update task STARTED').waitFor();
      await activeLearning.getByRole('button', { name: 'Stop Training' }).waitFor();
      const screenshot = await shot(page, '11_training.png');
      // what the server says while the panel shows the run
      const status = await page.evaluate(async (server) => {
        const answer = await fetch(`${server}/train/?check_if_running=true`);
        return { status: answer.status, body: await answer.json() };
      }, config.server);
      // the panel's Stop Training, so the run does not keep the CPU busy: DELETE /train/
      const [stopped] = await Promise.all([
        page.waitForResponse((r) => r.url().endsWith('/train/') && r.request().method() === 'DELETE'),
        activeLearning.getByRole('button', { name: 'Stop Training' }).click(),
      ]);
      await page.getByText('Model update task STOPPED').waitFor();
      await activeLearning.getByRole('button', { name: 'Update Model' }).waitFor();
      return { started: request(started), status, stopped: request(stopped), screenshot };
    });

    await step('next_sample', page, async () => {
      const activeLearning = tab(page, 'Active Learning');
      // the annotator picks the strategy; the bundled panel has no handler for the list (onChangeStrategy is
      // undefined) and asks "random" whatever is picked (docs/OHIF.md)
      await activeLearning.locator('select').selectOption(config.strategy);
      const [response] = await Promise.all([
        page.waitForResponse((r) => r.url().includes('/activelearning/'), { timeout: INFER_TIMEOUT_MS }),
        activeLearning.getByRole('button', { name: 'Next Sample' }).click(),
      ]);
      const answer = await response.json();
      await page.getByText('Active Learning - Next Sample').waitFor();
      const form = await shot(page, '12_next_sample.png');
      // OK reloads the viewer on the sample's study after a confirm() ("This action will reload current page.")
      page.once('dialog', (dialog) => dialog.accept());
      await Promise.all([page.waitForURL(`**${answer.StudyInstanceUID}`), page.getByRole('button', { name: 'OK' }).click()]);
      await waitForVolume(page);
      return {
        request: request(response),
        answer,
        url: page.url(),
        shown: await shownSeries(page),
        form,
        screenshot: await shot(page, '13_next_sample_opened.png'),
      };
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
