from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('mqttd', '0002_topic_any_length'),
    ]

    operations = [
        migrations.CreateModel(
            name='PublisherRange',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('project', models.CharField(max_length=255)),
                ('pub', models.CharField(max_length=255)),
                ('first', models.BigIntegerField()),
                ('last', models.BigIntegerField()),
                ('first_seen_at', models.DateTimeField()),
                ('last_seen_at', models.DateTimeField()),
            ],
            options={
                'indexes': [models.Index(fields=['project', 'pub', 'first'], name='mqttd_pubrange_pub_first')],
            },
        ),
    ]
