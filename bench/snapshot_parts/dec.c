// Keyframe decode cost as snapshot-worker decodes (single thread, low delay; a keyframe that
// gives no picture at once is drained with EOF and the decoder flushed), thread CPU time per
// keyframe: one decoder for all keyframes (FRESH 0) or a new one per keyframe (1, as each
// tick does), loop filter on (SKIPLF 0) or skipped (1); MALLOPT=1 sets the glibc thresholds
// media::init sets (freed decoder memory kept for the next decoder). With `perf stat -e
// page-faults` it shows where a fresh decoder's time goes.
// Build: gcc -O2 -o dec dec.c $(pkg-config --cflags --libs libavformat libavcodec libavutil)
// Run:   [MALLOPT=1] ./dec FILE FRESH SKIPLF [REPEATS]
#include <libavformat/avformat.h>
#include <libavcodec/avcodec.h>
#include <time.h>
#include <stdio.h>
#include <string.h>
#include <malloc.h>
static double cpu(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec*1e3+t.tv_nsec/1e6;}
static AVCodecContext* mk(AVStream*st,int skiplf){
  const AVCodec*c=avcodec_find_decoder(st->codecpar->codec_id);
  AVCodecContext*d=avcodec_alloc_context3(c); avcodec_parameters_to_context(d,st->codecpar);
  d->thread_count=1; d->thread_type=FF_THREAD_SLICE; d->flags|=AV_CODEC_FLAG_LOW_DELAY;
  if(skiplf) d->skip_loop_filter=AVDISCARD_ALL;
  avcodec_open2(d,c,NULL); return d;
}
int main(int argc,char**argv){
  const char*f=argv[1]; int fresh=atoi(argv[2]); int skiplf=atoi(argv[3]); int reps=argc>4?atoi(argv[4]):1;
  av_log_set_level(AV_LOG_QUIET);
  if(getenv("MALLOPT")){ mallopt(M_MMAP_THRESHOLD, 8<<20); mallopt(M_TRIM_THRESHOLD, 32<<20);}
  AVFormatContext*ic=NULL; AVDictionary*o=NULL; av_dict_set(&o,"codec_whitelist","none",0);
  avformat_open_input(&ic,f,NULL,&o); avformat_find_stream_info(ic,NULL);
  int v=av_find_best_stream(ic,AVMEDIA_TYPE_VIDEO,-1,-1,NULL,0); AVStream*st=ic->streams[v];
  AVPacket*p=av_packet_alloc(); AVPacket*keys[64]; int nk=0; int64_t last=AV_NOPTS_VALUE;
  for(;;){ if(last!=AV_NOPTS_VALUE && av_seek_frame(ic,v,last+1,0)<0) break;
    if(av_read_frame(ic,p)<0) break;
    if(p->stream_index!=v) {av_packet_unref(p);continue;}
    if(p->flags&AV_PKT_FLAG_KEY){ keys[nk++]=av_packet_clone(p); last=p->pts; } av_packet_unref(p); if(nk==64)break; }
  AVFrame*fr=av_frame_alloc(); AVCodecContext*d=NULL; double t0=cpu(); int n=0;
  for(int r=0;r<reps;r++) for(int i=0;i<nk;i++){
    if(!d||fresh){ if(d) avcodec_free_context(&d); d=mk(st,skiplf);} 
    avcodec_send_packet(d,keys[i]); if(avcodec_receive_frame(d,fr)==0) n++; else { avcodec_send_packet(d,NULL); if(avcodec_receive_frame(d,fr)==0) n++; avcodec_flush_buffers(d);} av_frame_unref(fr);
  }
  printf("%s fresh=%d skiplf=%d: %d frames, %.2f ms/keyframe\n",f,fresh,skiplf,n,(cpu()-t0)/n);
}
