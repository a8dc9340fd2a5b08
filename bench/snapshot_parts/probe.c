// Open and demux cost of one file the way snapshot-worker opens and reads it (FFmpeg's C API,
// the same calls as workers/snapshot/src/media.rs), thread CPU time:
//   open: avformat_open_input + avformat_find_stream_info, with the probe's picture decode
//         (WHITELIST=0) or without it (1: codec_whitelist "none", as Input::open does for MP4);
//   read: every packet to the end (MODE plain), the demuxer's non-key discard (nonkey: wrong
//         presentation times on MOV), or a seek from each keyframe to the next (seek, as
//         Input::read does for MP4 once keep_only_video_keyframes is set).
// Build: gcc -O2 -o probe probe.c $(pkg-config --cflags --libs libavformat libavcodec libavutil)
// Run:   ./probe FILE plain|nonkey|seek WHITELIST [v]   (v: print each keyframe's pts and dts)
#include <libavformat/avformat.h>
#include <libavcodec/avcodec.h>
#include <time.h>
#include <stdio.h>
#include <string.h>
static double cpu(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec*1e3+t.tv_nsec/1e6;}
int main(int argc,char**argv){
  const char*f=argv[1]; const char*mode=argv[2]; int wl=argc>3&&atoi(argv[3]);
  av_log_set_level(AV_LOG_QUIET);
  AVFormatContext*ic=NULL; AVDictionary*o=NULL;
  if(wl) av_dict_set(&o,"codec_whitelist","none",0);
  double t0=cpu();
  if(avformat_open_input(&ic,f,NULL,&o)<0){printf("open fail\n");return 1;}
  if(avformat_find_stream_info(ic,NULL)<0){printf("find fail\n");return 1;}
  double t1=cpu();
  int v=av_find_best_stream(ic,AVMEDIA_TYPE_VIDEO,-1,-1,NULL,0);
  AVStream*st=ic->streams[v];
  printf("open %.2f ms fmt=%s w=%d h=%d pixfmt=%d start=%lld dur=%lld tb=%d/%d vdelay=%d\n",t1-t0,ic->iformat->name,st->codecpar->width,st->codecpar->height,st->codecpar->format,(long long)st->start_time,(long long)ic->duration,st->time_base.num,st->time_base.den,st->codecpar->video_delay);
  for(unsigned i=0;i<ic->nb_streams;i++) if((int)i!=v) ic->streams[i]->discard=AVDISCARD_ALL;
  if(!strcmp(mode,"nonkey")) st->discard=AVDISCARD_NONKEY;
  AVPacket*p=av_packet_alloc(); int n=0,k=0; long bytes=0;
  double t2=cpu(); int64_t last=AV_NOPTS_VALUE;
  for(;;){
    if(!strcmp(mode,"seek") && last!=AV_NOPTS_VALUE){
      if(av_seek_frame(ic,v,last+1,0)<0){break;}
    }
    int r=av_read_frame(ic,p); if(r<0) break;
    if(p->stream_index==v){n++; bytes+=p->size; if(p->flags&AV_PKT_FLAG_KEY){k++; if(argc>4) printf(" key pts=%lld dts=%lld\n",(long long)p->pts,(long long)p->dts); last=p->pts;}}
    av_packet_unref(p);
  }
  printf("%s: read %.2f ms, %d video pkts, %d keys, %ld bytes\n",mode,cpu()-t2,n,k,bytes);
  return 0;
}
