// AudioWorklet processor: microphone audio -> 16 kHz mono PCM16 chunks for `audio_stream`.
//
// Messages from the page: "start" (begin a recording), "stop" (end it). To the page:
// {pcm: Int16Array} for every full chunk and for the remainder at "stop", then {done: true}.
// The AudioContext normally already runs at 16 kHz (the browser resamples the microphone); where
// it cannot (some browsers refuse a microphone at another rate than the device's), the context runs
// at the device rate and this processor resamples by linear interpolation. At equal rates the
// interpolation reads every input sample exactly once, unchanged.

class PcmRecorder extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate, chunkSamples } = options.processorOptions;
    this.step = sampleRate / targetRate; // input samples per output sample
    this.chunkSamples = chunkSamples;
    this.chunk = new Int16Array(chunkSamples);
    this.filled = 0;
    this.recording = false;
    this.position = 0; // input index of the next output sample; -1 is `previous`
    this.previous = 0;
    this.port.onmessage = ({ data }) => {
      if (data === "start") {
        this.recording = true;
        this.filled = 0;
        this.position = 0;
      } else if (data === "stop") {
        this.recording = false;
        if (this.filled) this.post(this.chunk.slice(0, this.filled));
        this.filled = 0;
        this.port.postMessage({ done: true });
      }
    };
  }

  post(pcm) {
    this.port.postMessage({ pcm }, [pcm.buffer]);
  }

  emit(sample) {
    const clamped = Math.max(-1, Math.min(1, sample));
    this.chunk[this.filled++] = Math.round(clamped * 32767);
    if (this.filled === this.chunkSamples) {
      this.post(this.chunk); // transferred: the next chunk needs a new buffer
      this.chunk = new Int16Array(this.chunkSamples);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.recording || input.length === 0) return true;
    const mono = input.length === 1 ? input[0] : input[0].map((value, i) => (value + input[1][i]) / 2);
    let t = this.position;
    while (t < mono.length - 1) {
      const i = Math.floor(t);
      const fraction = t - i;
      const a = i < 0 ? this.previous : mono[i];
      this.emit(fraction === 0 ? a : a + (mono[i + 1] - a) * fraction);
      t += this.step;
    }
    this.position = t - mono.length;
    this.previous = mono[mono.length - 1];
    return true;
  }
}

registerProcessor("pcm-recorder", PcmRecorder);
